"""DETR-R50 (DETR's own baseline) through the main launcher, on the toy set at a tiny size."""
import re

import numpy as np
import pytest

import train_testing

pytestmark = pytest.mark.slow


def test_detr_r50_trains_with_its_loss_falling(tmp_path):
  config_file = train_testing.write_config_file(tmp_path / 'micro.py', str(tmp_path / 'data'),
                                                steps=100)
  result = train_testing.run_script('projects/qna_detr/main.py', [
      f'--config={config_file}', f'--workdir={tmp_path / "run"}',
      '--config.model.backbone=resnet50', '--config.model.position_at_input=False',
      '--config.optimizer.lr=1e-4', '--config.optimizer.backbone_lr=1e-5',
      '--config.log_every_steps=10', '--config.checkpoint_every_steps=1000'],
      extra_env={'JAX_DISABLE_MOST_OPTIMIZATIONS': '0'}, timeout=1500)  # 100 steps to run.
  assert result.returncode == 0, result.stderr[-3000:]
  losses = [float(v) for v in re.findall(r'train \d+/100  loss ([\d.]+)', result.stderr)]
  assert len(losses) == 10
  # In 100 steps at this size the loss falls by about 15% (the no-object prior, then the
  # boxes: 13.9, 13.6, 12.2 ... 11.3, 11.0, 11.1); a step without gradients, or a NaN, shows
  # no fall.
  assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
