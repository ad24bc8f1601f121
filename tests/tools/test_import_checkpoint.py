"""tools/import_checkpoint.py: IDEA-Research/DINO's checkpoint (the torch-written fixture) into
a workdir that the Detector API reads like a trained run's, its head exactly the converted
tensors, its backbone from --config.pretrained.path."""
import json
import pathlib
import sys
import textwrap

from flax import traverse_util
import jax
import numpy as np
import pytest

from qna_detr import Detector
from qna_detr import workdir as run_files
from qna_detr.detectors.dino import official_weights
from qna_detr.utils import checkpoint_io
import train_testing

pytestmark = pytest.mark.slow  # Subprocesses.
ROOT = train_testing.ROOT
FIXTURE = ROOT / 'tests' / 'detectors' / 'testdata' / 'dino_tiny.pth'
sys.path.insert(0, str(ROOT / 'tests' / 'detectors'))
ENV = {'PYTHONPATH': f'{ROOT}:{ROOT / "tests" / "detectors"}'}


def _config_file(path: pathlib.Path, data_dir: str) -> pathlib.Path:
  """The fixture's DINO over the plugin backbone, on the tests' toy set."""
  path.write_text(textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {str(ROOT / 'tests' / 'train')!r})
      import train_testing

      def get_config():
        config = train_testing.micro_config({data_dir!r}, detector='dino')
        config.imports = ('levels_plugin',)
        config.model.update(dict(backbone='fixture_levels', feature_levels=(0, 1, 2),
                                 num_feature_levels=4, hidden_dim=256, num_heads=8,
                                 num_encoder_layers=2, num_decoder_layers=2,
                                 dim_feedforward=32, num_queries=12, enc_points=4,
                                 dec_points=4, dn_number=50))
        config.eval_top_k = 20
        return config
  '''))
  return path


def test_a_released_dino_checkpoint_becomes_a_workdir(tmp_path, toy_dir):
  import levels_plugin  # pylint: disable=g-import-not-at-top
  backbone = levels_plugin.FixtureLevels().init(jax.random.PRNGKey(0),
                                                np.zeros((1, 64, 64, 3), np.float32),
                                                np.zeros((1, 64, 64), bool))['params']
  weights_dir = checkpoint_io.CheckpointDir(str(tmp_path / 'backbone'), create=True)
  weights_dir.save(1, {'params': {'backbone': backbone}})
  weights_dir.close()
  workdir = tmp_path / 'imported'
  args = [f'--config={_config_file(tmp_path / "config.py", toy_dir)}', f'--checkpoint={FIXTURE}',
          f'--workdir={workdir}', f'--config.pretrained.path={tmp_path / "backbone" / "1"}',
          '--category_ids=0,1,2,3', '--class_names=rectangle,ellipse,triangle,cross']
  result = train_testing.run_script('tools/import_checkpoint.py', args, extra_env=ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '121 tensors mapped, 24 aliases of mapped ones, 0 unknown' in result.stderr
  stored = json.loads((workdir / 'config.json').read_text())
  assert stored['dataset']['class_names'] == ['rectangle', 'ellipse', 'triangle', 'cross']

  run = run_files.load_run(str(workdir))
  assert run.step_dir == str(workdir / 'checkpoints' / '0')
  head, _ = official_weights.read(str(FIXTURE), num_heads=8, category_ids=[0, 1, 2, 3])
  got = traverse_util.flatten_dict(run.params, sep='/')
  for name, value in traverse_util.flatten_dict(head, sep='/').items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  for name, value in traverse_util.flatten_dict(backbone, sep='/').items():
    np.testing.assert_array_equal(got[f'backbone/{name}'], value, err_msg=name)
  found = Detector(run)(np.zeros((60, 80, 3), np.uint8))
  assert len(found) == 20 and np.isfinite(found.boxes).all()

  again = train_testing.run_script('tools/import_checkpoint.py', args, extra_env=ENV)
  assert again.returncode != 0 and 'already holds checkpoints' in again.stderr
