"""Runs that go wrong, through the launcher: a diverging loss, and a kill -9 mid-checkpoint."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qna_detr.utils import checkpoint_io
import train_testing

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _command(config_file, workdir, *overrides):
  return [sys.executable, str(ROOT / 'projects/qna_detr/main.py'), f'--config={config_file}',
          f'--workdir={workdir}', *overrides]


def _env():
  python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': python_path}


def test_a_diverging_loss_stops_the_run_and_every_checkpoint_stays_finite(tmp_path):
  config_file = train_testing.write_config_file(tmp_path / 'micro.py', str(tmp_path / 'data'),
                                                steps=40)
  result = subprocess.run(
      _command(config_file, tmp_path / 'run', '--config.optimizer.lr=1000',
               '--config.optimizer.backbone_lr=1000', '--config.checkpoint_every_steps=1',
               '--config.log_every_steps=4'),
      env=_env(), capture_output=True, text=True, timeout=900)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('ERROR: NonFiniteLoss: train step ') and 'loss nan' in last, last
  assert not (tmp_path / 'run' / 'metrics.json').exists()
  steps = checkpoint_io.CheckpointDir(str(tmp_path / 'run' / 'checkpoints')).complete_steps()
  failed_at = int(last.split('train step ')[1].split(':')[0])
  assert steps and max(steps) < failed_at
  for step in steps:  # read_tree checks every value is finite (and the checksums).
    checkpoint_io.read_tree(str(tmp_path / 'run' / 'checkpoints' / str(step)))


def test_a_kill_during_a_checkpoint_write_then_an_exact_resume(tmp_path):
  config_file = train_testing.write_config_file(tmp_path / 'micro.py', str(tmp_path / 'data'),
                                                steps=10)
  overrides = ['--config.checkpoint_every_steps=1', '--config.keep_checkpoints=20']
  straight = subprocess.run(_command(config_file, tmp_path / 'straight', *overrides),
                            env=_env(), capture_output=True, text=True, timeout=900)
  assert straight.returncode == 0, straight.stderr[-3000:]

  checkpoints = tmp_path / 'killed' / 'checkpoints'
  process = subprocess.Popen(_command(config_file, tmp_path / 'killed', *overrides), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed_during = None
  deadline = time.time() + 600
  while process.poll() is None and time.time() < deadline:
    names = os.listdir(checkpoints) if checkpoints.is_dir() else []
    writing = [n for n in names if 'tmp' in n]
    if writing and any(n.isdigit() for n in names):  # A write after the first step's.
      process.send_signal(signal.SIGKILL)
      killed_during = writing[0]
      break
    time.sleep(0.002)
  process.wait()
  if killed_during is None:
    pytest.skip('the run finished before a checkpoint write was caught in flight')
  resumed = subprocess.run(_command(config_file, tmp_path / 'killed', *overrides), env=_env(),
                           capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from step' in resumed.stderr
  final = [checkpoint_io.read_tree(str(tmp_path / run / 'checkpoints' / '10'))['params']
           for run in ('straight', 'killed')]
  for a, b in zip(jax.tree.leaves(final[0]), jax.tree.leaves(final[1]), strict=True):
    np.testing.assert_array_equal(a, b)
