"""Training checkpoints: the train state (orbax, `utils.checkpoint_io`) and the position of the
tf.data iterator, for an exact resume.

The state goes to <root>/checkpoints/<step> (keeping the last K); each process also saves its
data iterator to <root>/data_state/<step>/process_<i> with tf.train.Checkpoint, so that a
resumed run reads exactly the batches an uninterrupted run would have read, without replaying
the input pipeline. A run resumes from the newest intact step: broken newer ones are named in
a warning and skipped.
"""
import logging
import os
import shutil
from typing import Any, Optional

import jax
import tensorflow as tf

from qna_detr import workdir as run_files
from qna_detr.utils import checkpoint_io

logger = logging.getLogger(__name__)

SUBDIR = run_files.CHECKPOINTS


def checkpoint_dir(root: str) -> checkpoint_io.CheckpointDir:
  """The train states of a workdir, to read (nothing is written or moved)."""
  return checkpoint_io.CheckpointDir(os.path.join(root, SUBDIR))


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs under `root` (a workdir)."""

  def __init__(self, root: str, keep: int):
    self._data_dir = os.path.join(root, 'data_state')
    self._states = checkpoint_io.CheckpointDir(os.path.join(root, SUBDIR), keep=keep,
                                               create=True)
    self._states.complete_or_move_incomplete(logger.warning)

  @property
  def directory(self) -> str:
    return self._states.directory

  def latest_step(self) -> Optional[int]:
    steps = self._states.complete_steps()
    return steps[-1] if steps else None

  def _data_path(self, step: int) -> str:
    return os.path.join(self._data_dir, str(step), f'process_{jax.process_index()}')

  def save(self, step: int, state: Any, iterator: Optional[tf.data.Iterator] = None) -> None:
    """Writes the checkpoint and waits for it: a crash right after still finds it."""
    if iterator is not None:
      tf.train.Checkpoint(iterator=iterator).write(self._data_path(step))
    self._states.save(step, state)
    self._prune_data_states()

  def _prune_data_states(self) -> None:
    if jax.process_index() != 0 or not os.path.isdir(self._data_dir):
      return
    kept = {str(s) for s in self._states.complete_steps()}
    for name in os.listdir(self._data_dir):
      if name not in kept:
        shutil.rmtree(os.path.join(self._data_dir, name), ignore_errors=True)

  def restore(self, abstract_state: Any, iterator: Optional[tf.data.Iterator] = None) -> Any:
    """The newest intact state; the iterator too when one is given and was saved."""
    step, state = self._states.restore_newest_intact(abstract_state, logger.warning,
                                                     move_broken=True)
    if iterator is not None:
      path = self._data_path(step)
      if tf.io.gfile.exists(path + '.index'):
        tf.train.Checkpoint(iterator=iterator).read(path).assert_consumed()
      else:
        logger.warning('No data iterator state for step %d at %s: the input pipeline starts '
                        'from its beginning.', step, path)
    return state

  def close(self) -> None:
    self._states.close()
