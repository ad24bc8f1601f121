"""Orbax checkpoints of the train state, plus the tf.data iterator position for exact resume.

The state goes to WORKDIR/checkpoints/<step> (orbax, keeps the last K); each process also saves
its data iterator to WORKDIR/data_state/<step>/process_<i> with tf.train.Checkpoint, so that a
resumed run reads exactly the batches an uninterrupted run would have read, without replaying
the input pipeline.
"""
import dataclasses
import os
import shutil
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp
import tensorflow as tf


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs in a workdir."""

  def __init__(self, workdir: str, keep: int):
    self._data_dir = os.path.join(workdir, 'data_state')
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def _data_path(self, step: int) -> str:
    return os.path.join(self._data_dir, str(step), f'process_{jax.process_index()}')

  def save(self, step: int, state: Any, iterator: Optional[tf.data.Iterator] = None) -> None:
    """Writes the checkpoint and waits for it: a crash right after still finds it."""
    if iterator is not None:
      tf.train.Checkpoint(iterator=iterator).write(self._data_path(step))
    self._manager.save(step, args=ocp.args.StandardSave(state))
    self._manager.wait_until_finished()
    self._prune_data_states()

  def _prune_data_states(self) -> None:
    if jax.process_index() != 0 or not os.path.isdir(self._data_dir):
      return
    kept = {str(s) for s in self._manager.all_steps()}
    for name in os.listdir(self._data_dir):
      if name not in kept:
        shutil.rmtree(os.path.join(self._data_dir, name), ignore_errors=True)

  def restore(self, abstract_state: Any, step: Optional[int] = None,
              iterator: Optional[tf.data.Iterator] = None) -> Any:
    """The state at `step` (default: latest); the iterator too when one is given and saved."""
    step = self.latest_step() if step is None else step
    state = _restore_checked(self._manager, step, abstract_state)
    if iterator is not None:
      path = self._data_path(step)
      if tf.io.gfile.exists(path + '.index'):
        tf.train.Checkpoint(iterator=iterator).read(path).assert_consumed()
      else:
        logging.warning('No data iterator state for step %d at %s: the input pipeline starts '
                        'from its beginning.', step, path)
    return state

  def close(self) -> None:
    self._manager.close()


def find(workdir: str, checkpoint: Optional[str] = None) -> str:
  """The step directory to read: `checkpoint` if given, else the workdir's latest."""
  if checkpoint:
    step_name = os.path.basename(os.path.normpath(checkpoint))
    if not os.path.isdir(checkpoint) or not step_name.isdigit():
      raise FileNotFoundError(f'--checkpoint={checkpoint} is not a checkpoint step directory '
                              '(WORKDIR/checkpoints/<step>).')
    return os.path.abspath(checkpoint)
  root = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  steps = sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {root} (train first, or pass --checkpoint).')
  return os.path.join(root, str(steps[-1]))


def restore_state(step_dir: str, abstract_state: Any) -> Any:
  """The train state stored in an orbax step directory (e.g. WORKDIR/checkpoints/1000).

  A checkpoint of another model (a different config) fails with a message naming both.
  """
  manager = ocp.CheckpointManager(os.path.dirname(step_dir))
  try:
    return _restore_checked(manager, int(os.path.basename(step_dir)), abstract_state)
  finally:
    manager.close()


def _restore_checked(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """manager's checkpoint at step, or a ValueError naming it if it is not of this model."""
  step_dir = os.path.join(str(manager.directory), str(step))
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, TypeError) as e:
    state = _restore_without_empty_fields(manager, step, abstract_state)
    if state is None:
      raise _mismatch(step_dir, str(e)[:2000]) from e
  # Orbax restores arrays with the stored shapes whatever the target's: compare them here.
  stored = jax.tree_util.tree_leaves_with_path(state)
  wanted = jax.tree_util.tree_leaves(abstract_state)
  different = [f'{jax.tree_util.keystr(path)}: stored {tuple(a.shape)}, model {tuple(b.shape)}'
               for (path, a), b in zip(stored, wanted) if tuple(a.shape) != tuple(b.shape)]
  if different:
    raise _mismatch(step_dir, f'{len(different)} shapes differ: ' + '; '.join(different[:5]))
  return state


def _restore_without_empty_fields(manager: ocp.CheckpointManager, step: int,
                                  abstract_state: Any) -> Optional[Any]:
  """A state dataclass restored from a checkpoint that lacks its None fields (one written
  before the field existed, e.g. a run without a moving average), or None if that fails."""
  if not dataclasses.is_dataclass(abstract_state):
    return None
  present = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
             if getattr(abstract_state, f.name) is not None}
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(present))
  except (ValueError, KeyError, TypeError):
    return None
  return abstract_state.replace(**restored)


def _mismatch(step_dir: str, details: str) -> ValueError:
  return ValueError(f'The checkpoint {step_dir} does not fit the model of this config (was it '
                    f'written with another config?): {details}')
