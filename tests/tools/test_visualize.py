"""tools/visualize.py on a tiny checkpoint: one PNG of each kind, and a bad --layer named."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from qna_detr.data import toy

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tests' / 'train'))
import train_testing  # noqa: E402  pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow  # Subprocesses: the tools and the launcher.


def _run(args: list[str]) -> subprocess.CompletedProcess:
  return train_testing.run_script('tools/visualize.py', args, timeout=600)


@pytest.fixture(scope='module')
def setup(tmp_path_factory, toy_dir) -> list[str]:
  root = tmp_path_factory.mktemp('visualize')
  workdir = str(root / 'run')
  train_testing.write_random_checkpoint(workdir, train_testing.micro_config(toy_dir))
  config_file = train_testing.write_config_file(root / 'micro_config.py', toy_dir)
  return [f'--config={config_file}', f'--workdir={workdir}']


def _distinct_colours(image: Image.Image) -> int:
  return len(np.unique(np.asarray(image.convert('RGB')).reshape(-1, 3), axis=0))


def test_renders_each_kind(setup, toy_dir, tmp_path):
  result = _run(setup + [f'--output={tmp_path}', '--num_images=1', '--threshold=0',
                         '--min_side=0', '--head=all', '--layer=stage1_qna1'])
  assert result.returncode == 0, result.stderr[-4000:]
  files = sorted(os.listdir(tmp_path))
  name = files[0].split('_')[0]
  assert files == [f'{name}_attention_stage1_qna1.png', f'{name}_detections.png',
                   f'{name}_kernels_stage1_qna1.png', 'kernel_parameters_stage1_qna1.png']

  paths = toy.paths(toy_dir)
  info = next(im for im in json.loads(pathlib.Path(paths['val_json']).read_text())['images']
              if im['id'] == int(name))
  original = np.asarray(Image.open(os.path.join(paths['val_images'], info['file_name'])),
                        np.int32)
  drawn = Image.open(tmp_path / f'{name}_detections.png')
  assert drawn.size == (info['width'], info['height'])
  # With threshold 0 every query's box is drawn: outlines and captions, not the whole image.
  changed = (np.abs(np.asarray(drawn.convert('RGB'), np.int32) - original) > 40).any(-1)
  assert 0.01 < changed.mean() < 0.9

  heat = Image.open(tmp_path / f'{name}_attention_stage1_qna1.png')
  assert heat.width >= 2 * info['width'] and heat.height >= 2 * info['height']  # 4 heads.
  assert _distinct_colours(heat) > 100
  for png in (f'{name}_kernels_stage1_qna1.png', 'kernel_parameters_stage1_qna1.png'):
    assert _distinct_colours(Image.open(tmp_path / png)) > 20, png


def test_bad_layer_names_the_flag(setup, tmp_path):
  result = _run(setup + [f'--output={tmp_path}', '--layer=stage9'])
  assert result.returncode != 0
  assert '--layer=stage9' in result.stderr and 'stage1_qna1' in result.stderr
  assert not os.listdir(tmp_path)
