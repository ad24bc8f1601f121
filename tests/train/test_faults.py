"""Runs that go wrong, through the launcher: a diverging loss, a kill -9 mid-checkpoint, a
damaged newest checkpoint."""
import os
import pathlib
import shutil
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


OVERRIDES = ['--config.checkpoint_every_steps=1', '--config.keep_checkpoints=20']


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """(config file, the final parameters) of an uninterrupted 10-step run."""
  root = tmp_path_factory.mktemp('straight')
  config_file = train_testing.write_config_file(root / 'micro.py', str(root / 'data'), steps=10)
  result = subprocess.run(_command(config_file, root / 'run', *OVERRIDES), env=_env(),
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return config_file, checkpoint_io.read_tree(str(root / 'run' / 'checkpoints' / '10'))['params']


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_the_step_and_the_same_command_resumes_exactly(tmp_path, straight):
  config_file, final = straight
  checkpoints = tmp_path / 'run' / 'checkpoints'
  process = subprocess.Popen(_command(config_file, tmp_path / 'run', *OVERRIDES), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while time.time() < deadline and not (checkpoints / '2').is_dir():
    time.sleep(0.01)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode != 0
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('ERROR: Stopped: train: stopped at step ') and 'SIGTERM' in last, last
  assert 'rerun the same command to resume' in last
  stopped_at = int(last.split('stopped at step ')[1].split(' ')[0])
  assert 2 <= stopped_at < 10 and (checkpoints / str(stopped_at)).is_dir()
  assert not (tmp_path / 'run' / 'run.lock').exists()  # Released on the way out.
  resumed = subprocess.run(_command(config_file, tmp_path / 'run', *OVERRIDES), env=_env(),
                           capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from step {stopped_at}' in resumed.stderr
  _same(final, checkpoint_io.read_tree(str(checkpoints / '10'))['params'])


def test_a_second_start_on_a_workdir_in_use_is_refused_then_a_dead_ones_lock_taken(tmp_path,
                                                                                  straight):
  config_file, _ = straight
  workdir = tmp_path / 'run'
  first = subprocess.Popen(_command(config_file, workdir, '--config.num_train_steps=100000'),
                           env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and not (workdir / 'run.lock').exists():
    time.sleep(0.01)
  second = subprocess.run(_command(config_file, workdir), env=_env(), capture_output=True,
                          text=True, timeout=900)
  assert second.returncode != 0
  assert f'another run uses this workdir (host ' in second.stderr
  assert f'pid {first.pid}' in second.stderr
  first.send_signal(signal.SIGKILL)
  first.wait()
  assert (workdir / 'run.lock').exists()  # A killed process leaves its lock behind.
  third = subprocess.run(_command(config_file, workdir, '--config.num_train_steps=1'),
                         env=_env(), capture_output=True, text=True, timeout=900)
  assert third.returncode == 0, third.stderr[-3000:]
  assert f'Taking over {workdir}/run.lock from pid {first.pid}' in third.stderr


def test_a_kill_during_a_checkpoint_write_then_an_exact_resume(tmp_path, straight):
  config_file, final_straight = straight
  overrides = OVERRIDES

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
  final = [final_straight,
           checkpoint_io.read_tree(str(tmp_path / 'killed' / 'checkpoints' / '10'))['params']]
  _same(final[0], final[1])
  # Then the newest step damaged (another step's arrays in its place, which decode cleanly):
  # the same command moves it aside, resumes from step 9, writes step 10 anew (the state of
  # an uninterrupted run, bit for bit), and the tools read it without a warning.
  newest = checkpoints / '10' / 'default'
  for name in os.listdir(newest):
    if name != '_METADATA':
      _replace(newest / name, checkpoints / '9' / 'default' / name)
  rerun = subprocess.run(_command(config_file, tmp_path / 'killed', *overrides), env=_env(),
                         capture_output=True, text=True, timeout=900)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'Resumed from step 9' in rerun.stderr and 'Moved ' in rerun.stderr
  assert len(list(checkpoints.glob('10.broken-*'))) == 1
  _same(final[0], checkpoint_io.read_tree(str(checkpoints / '10'))['params'])
  evaluated = subprocess.run([sys.executable, str(ROOT / 'tools/evaluate.py'),
                              f'--workdir={tmp_path / "killed"}'], env=_env(),
                             capture_output=True, text=True, timeout=900)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'broken' not in evaluated.stderr and 'checkpoints/10 on' in evaluated.stdout


def _replace(path, source):
  """`path`'s content replaced by `source`'s (a directory by a copy of the other)."""
  if path.is_dir():
    shutil.rmtree(path)
    shutil.copytree(source, path)
  else:
    shutil.copy(source, path)
