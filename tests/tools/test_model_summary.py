"""tools/model_summary.py: the released models' parameter counts, rows that add up."""
import json

import numpy as np
import pytest

import train_testing

pytestmark = pytest.mark.slow  # Subprocesses: the tools and the launcher.


@pytest.mark.parametrize('backbone,count', [('resnet50', 25_557_032),
                                            ('qna_vit_tiny_7x7', 15_753_960)])
def test_counts_of_the_released_classifiers_and_rows_that_add_up(backbone, count):
  result = train_testing.run_script('tools/model_summary.py', [
      f'--backbone={backbone}', '--num_classes=1000', '--image_size=224', '--json'])
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['params'] == count
  assert sum(summary['params_by_module'].values()) == count
  assert 'head' in summary['params_by_module']


@pytest.mark.parametrize('config,classes,params,trainable', [
    # IDEA-Research/DINO's DINO-4scale ResNet-50, counted by torch (testdata of detectors).
    ('dino_resnet50_coco', 91, 'dino_r50_params', 'dino_r50_trainable'),
    # facebookresearch/detr's DETR-R50 as its main.py prints it ("number of params").
    ('detr_resnet50_coco', 91, 41_524_768, 41_302_368),
])
def test_whole_detectors_count_what_their_references_count(config, classes, params, trainable):
  """Frozen batch norms are buffers in torch (not counted); the stem and layer1 do not
  train."""
  reference = np.load(train_testing.ROOT / 'tests' / 'detectors' / 'testdata' / 'dino_tiny.npz')
  params = int(reference[params]) if isinstance(params, str) else params
  trainable = int(reference[trainable]) if isinstance(trainable, str) else trainable
  result = train_testing.run_script('tools/model_summary.py', [
      f'--config=configs/{config}.py', f'--num_classes={classes}', '--noflops', '--json'],
      cwd=str(train_testing.ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert (summary['params'], summary['trainable_params']) == (params, trainable)
  assert sum(summary['params_by_module'].values()) == params
