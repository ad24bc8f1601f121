"""Finding and restoring checkpoints: what is wrong is named, broken steps are skipped."""
import functools
import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from qna_detr import detectors
from qna_detr import workdir as run_files
from qna_detr.data import toy
from qna_detr.train import checkpoints
from qna_detr.train import train_step
from qna_detr.utils import checkpoint_io

import train_testing


@functools.lru_cache(maxsize=4)
def _detector_of(hidden_dim):
  config = train_testing.micro_config('unused')
  config.model.hidden_dim = hidden_dim
  return detectors.build(config, len(toy.CLASSES))


def _abstract(config):
  """The train state a resumed run restores."""
  return train_step.abstract_state(config, _detector_of(config.model.hidden_dim))


def _load(workdir, checkpoint, config):
  """(step dir, parameters) as the tools read them."""
  return run_files.load_params(str(workdir), checkpoint, _detector_of(config.model.hidden_dim),
                               config)


def _array_files(step_dir):
  """The step's array data files, largest first."""
  files = glob.glob(os.path.join(step_dir, 'default', 'ocdbt.process_0', 'd', '*'))
  return sorted(files, key=os.path.getsize, reverse=True)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """Steps 1, 2 and 3 of the micro config's state (different random values), written once."""
  root = tmp_path_factory.mktemp('written')
  config = train_testing.micro_config(str(root / 'data'))
  states = {step: train_testing.write_random_checkpoint(str(root), config, step=step, keep=3)
            for step in (1, 2, 3)}
  return root, config, states


@pytest.fixture
def saved(tmp_path, written):
  """A copy of `written`'s steps in tmp_path, for a test to break."""
  root, config, states = written
  shutil.copytree(root / 'checkpoints', tmp_path / 'checkpoints')
  return config, states


def _input_proj(params):
  return np.asarray(params['input_proj']['kernel'])


def test_missing_checkpoints_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'No checkpoint in {tmp_path}/checkpoints'):
    run_files.find_checkpoint(str(tmp_path), None)
  with pytest.raises(FileNotFoundError, match='--checkpoint=/nowhere/5 is not a checkpoint'):
    run_files.find_checkpoint(str(tmp_path), '/nowhere/5')


def test_restores_its_own_config_and_refuses_another(tmp_path, saved):
  config, states = saved
  step_dir, restored = _load(tmp_path, None, config)
  assert step_dir == os.path.join(tmp_path, 'checkpoints', '3')
  np.testing.assert_array_equal(_input_proj(restored), _input_proj(states[3].params))
  step_dir, restored = _load(tmp_path, str(tmp_path / 'checkpoints' / '2'), config)
  np.testing.assert_array_equal(_input_proj(restored), _input_proj(states[2].params))

  other = train_testing.micro_config(str(tmp_path / 'data'))
  other.model.hidden_dim = 48  # Every head parameter changes shape.
  with pytest.raises(checkpoint_io.MismatchedCheckpoint,
                     match=f'checkpoint {tmp_path}/checkpoints/3 does not fit the model of this '
                     r'config.*stored \(32, 32\), model \(48, 48\)'):
    _load(tmp_path, None, other)
  # Resuming the workdir with the other config (what the training loop does) fails the same way.
  resume = checkpoints.Checkpointer(str(tmp_path), keep=3)
  with pytest.raises(checkpoint_io.MismatchedCheckpoint, match='does not fit the model'):
    resume.restore(_abstract(other))
  resume.close()


def _corrupt(step_dir, how):
  if how == 'arrays swapped':  # Data that decode cleanly but are not what was written.
    other = os.path.join(os.path.dirname(step_dir), '2', 'default')
    shutil.rmtree(os.path.join(step_dir, 'default'))
    shutil.copytree(other, os.path.join(step_dir, 'default'))
  elif how == 'flipped bit':
    path = _array_files(step_dir)[0]
    data = bytearray(open(path, 'rb').read())
    data[len(data) // 2] ^= 0x40
    open(path, 'wb').write(bytes(data))
  elif how == 'truncated array file':
    with open(_array_files(step_dir)[0], 'r+b') as f:
      f.truncate(100)
  elif how == 'deleted array file':
    os.remove(_array_files(step_dir)[0])
  elif how == 'deleted metadata':
    os.remove(os.path.join(step_dir, 'default', '_METADATA'))
  elif how == 'empty step directory':
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


@pytest.mark.parametrize('how,message', [
    ('arrays swapped', 'checksum mismatch'),
    # Caught by zstd when the bit lands in a compressed block, by the checksums otherwise.
    ('flipped bit', 'corrupt'),
    ('truncated array file', 'missing, truncated, corrupt or unreadable'),
    ('deleted array file', 'missing, truncated, corrupt or unreadable'),
    ('deleted metadata', 'metadata file'),
    ('empty step directory', 'is empty'),
])
def test_a_broken_step_is_named_and_the_newest_intact_one_restores(tmp_path, saved, how,
                                                                    message, caplog):
  """As a resumed run reads the whole state."""
  config, states = saved
  broken = str(tmp_path / 'checkpoints' / '3')
  _corrupt(broken, how)
  directory = checkpoint_io.CheckpointDir(str(tmp_path / 'checkpoints'))
  # Asked for by name: the error says which step and what is wrong with it.
  with pytest.raises(checkpoint_io.CorruptCheckpoint, match=f'{broken}.*{message}'):
    directory.restore(3, _abstract(config))
  # The newest intact step otherwise, with a warning that names the broken one.
  step, restored = directory.restore_newest_intact(_abstract(config),
                                                   lambda m: logging.getLogger().warning(m))
  directory.close()
  assert step == 2
  np.testing.assert_array_equal(_input_proj(restored.params), _input_proj(states[2].params))
  if how != 'empty step directory':  # An empty directory is no step at all: nothing to say.
    assert any(broken in r.getMessage() and message in r.getMessage() for r in caplog.records)


def test_the_tools_skip_a_step_whose_parameters_are_broken(tmp_path, saved, caplog):
  """The tools read the parameters alone, checked as the whole state is."""
  config, states = saved
  broken = str(tmp_path / 'checkpoints' / '3')
  _corrupt(broken, 'arrays swapped')
  with pytest.raises(checkpoint_io.CorruptCheckpoint, match=f'{broken}.*checksum mismatch'):
    _load(tmp_path, broken, config)
  step_dir, restored = _load(tmp_path, None, config)
  assert step_dir == str(tmp_path / 'checkpoints' / '2')
  np.testing.assert_array_equal(_input_proj(restored), _input_proj(states[2].params))
  assert any(broken in r.getMessage() for r in caplog.records)


def test_non_finite_states_are_never_written_or_restored(tmp_path, saved):
  config, states = saved
  bad = jax.tree.map(np.array, states[3])  # A copy: the fixture stays as written.
  bad.params['input_proj']['kernel'][0, 0] = np.nan
  directory = checkpoint_io.CheckpointDir(str(tmp_path / 'checkpoints'), keep=3)
  with pytest.raises(checkpoint_io.NonFiniteState, match=r'Refusing to write step 4.*'
                     'input_proj/kernel'):
    directory.save(4, bad)
  assert directory.complete_steps() == [1, 2, 3]  # Nothing written, nothing rotated out.
  directory.close()


def test_a_step_lacking_only_its_checksums_is_verified_and_kept(tmp_path, saved, caplog):
  config, states = saved
  os.remove(tmp_path / 'checkpoints' / '3' / checkpoint_io.CHECKSUMS)
  empty = tmp_path / 'checkpoints' / '4'
  empty.mkdir()  # Not a checkpoint at all: moved aside, not deleted.
  resume = checkpoints.Checkpointer(str(tmp_path), keep=3)
  assert (tmp_path / 'checkpoints' / '3' / checkpoint_io.CHECKSUMS).is_file()
  assert not empty.exists() and len(glob.glob(f'{empty}.broken-*')) == 1
  restored = resume.restore(_abstract(config))
  resume.close()
  np.testing.assert_array_equal(_input_proj(restored.params), _input_proj(states[3].params))
  assert 'lacked only its checksums' in caplog.text


def test_a_broken_newest_step_is_moved_aside_and_written_again(tmp_path, saved):
  """A resumed run falls back to step 2 and, reaching step 3 again, writes it anew."""
  config, states = saved
  _corrupt(str(tmp_path / 'checkpoints' / '3'), 'arrays swapped')
  resume = checkpoints.Checkpointer(str(tmp_path), keep=3)
  restored = resume.restore(_abstract(config))
  np.testing.assert_array_equal(_input_proj(restored.params), _input_proj(states[2].params))
  assert len(glob.glob(str(tmp_path / 'checkpoints' / '3.broken-*'))) == 1
  rerun = jax.tree.map(lambda x: x + 1 if np.issubdtype(x.dtype, np.floating) else x,
                       states[2])
  resume.save(3, rerun)  # Not skipped: the broken step no longer holds the number.
  resume.close()
  _, params = _load(tmp_path, None, config)
  np.testing.assert_array_equal(_input_proj(params), _input_proj(rerun.params))
  again = checkpoint_io.CheckpointDir(str(tmp_path / 'checkpoints'), keep=3)
  with pytest.raises(checkpoint_io.CheckpointError, match='step of that number is there'):
    again.save(3, rerun)
  again.close()
