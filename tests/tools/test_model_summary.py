"""tools/model_summary.py: the released models' parameter counts, rows that add up."""
import json

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
