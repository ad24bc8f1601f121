"""Orbax step directories: the project's one writer and reader of checkpoints.

A checkpoint directory holds one sub-directory per step, `<dir>/<step>`, which orbax writes
atomically. Orbax keeps no checksums, so a flipped bit in an array file restores silently:
every step written here also gets `checksums.json` (a CRC-32 of every array), written once
orbax has finished, which also marks the step as complete. Restoring checks, in this order,
that the step is complete, that its stored shapes fit the model, that every array file reads,
that the checksums agree and that every value is finite; each failure raises a
`CheckpointError` that names the step directory and what is wrong with it.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qna_detr.utils import files

CHECKSUMS = 'checksums.json'
_ITEM = 'default'  # The item directory orbax's manager writes inside a step.
Tree = Any


class CheckpointError(ValueError):
  """A step directory that cannot be used; the message names it and says why."""


class CorruptCheckpoint(CheckpointError):
  """Incomplete, unreadable, altered or non-finite: an older step may still be intact."""


class NonFiniteState(CheckpointError):
  """A tree with NaN or inf, refused on save."""


class MismatchedCheckpoint(CheckpointError):
  """Intact, but of another model (written with another config)."""


def leaf_name(path: tuple) -> str:
  """'params/backbone/stem/kernel': the same for a dataclass field, a dict key or an index, so
  that a tree restored without its target names its leaves as the saved tree did."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(parts)


def named_leaves(tree: Tree) -> dict[str, Any]:
  return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def checksums(host_tree: Tree) -> dict[str, int]:
  """CRC-32 of the bytes of every leaf of a tree of host (numpy) arrays."""
  return {name: zlib.crc32(np.ascontiguousarray(leaf).view(np.uint8).ravel())
          for name, leaf in named_leaves(host_tree).items()}


def non_finite_leaves(host_tree: Tree) -> list[str]:
  """Names of the floating-point leaves holding NaN or inf."""
  return [name for name, leaf in named_leaves(host_tree).items()
          if np.issubdtype(np.asarray(leaf).dtype, np.inexact)
          and not np.isfinite(np.asarray(leaf, np.float32)).all()]


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else type(error).__name__


class CheckpointDir:
  """The steps of one checkpoint directory (see the module doc).

  Args:
    directory: holds the step directories.
    keep: how many of the newest complete steps a save keeps (None: all).
    create: make the directory if it is missing.
  """

  def __init__(self, directory: str, keep: int | None = None, create: bool = False):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f'{self.directory} is a file, not a checkpoint directory')
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                             enable_async_checkpointing=False))

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def complete_steps(self) -> list[int]:
    """Steps whose write finished (orbax's and the checksums), oldest first."""
    return [s for s in sorted(self._manager.all_steps())
            if os.path.isfile(os.path.join(self.step_dir(s), CHECKSUMS))]

  def incomplete_steps(self) -> list[int]:
    """Step directories without checksums: writes cut short between orbax and the checksums,
    or directories that are not checkpoints (e.g. empty)."""
    complete = set(self.complete_steps())
    return [s for s in sorted(self._manager.all_steps()) if s not in complete]

  def move_aside(self, step: int, log: Callable[[str], None]) -> str:
    """Renames a step that cannot be used to <step>.broken-<UTC time> (process 0; never
    deleted), so that the step can be written again; returns the new name."""
    moved = f'{self.step_dir(step)}.broken-{time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}'
    if jax.process_index() == 0:
      os.replace(self.step_dir(step), moved)
    log(f'Moved {self.step_dir(step)} aside to {moved}')
    self._manager.reload()
    return moved

  def complete_or_move_incomplete(self, log: Callable[[str], None]) -> None:
    """Steps whose checksums alone are missing (orbax finished, the checksums' write was cut
    short) get them, where every array reads back finite; other incomplete steps (an empty
    directory, unreadable arrays) are moved aside. On process 0."""
    for step in self.incomplete_steps():
      try:
        host = jax.device_get(self._manager.restore(step))
        if non_finite_leaves(host) or not named_leaves(host):
          raise CorruptCheckpoint('non-finite or empty')
      except Exception as e:  # pylint: disable=broad-except  (TensorStore raises plain Exception)
        log(f'Checkpoint {self.step_dir(step)} is incomplete ({_first_line(e)})')
        self.move_aside(step, log)
        continue
      if jax.process_index() == 0:
        files.write_atomic(os.path.join(self.step_dir(step), CHECKSUMS),
                           lambda f, host=host: json.dump(checksums(host), f))
      log(f'Checkpoint {self.step_dir(step)} lacked only its checksums: its arrays read back '
          'whole, checksums written, kept')
    self._manager.reload()

  def save(self, step: int, tree: Tree) -> None:
    """Writes `tree` as `step` and waits for it; refuses a tree with non-finite values, so
    that rotation never drops a finite checkpoint for a broken one."""
    host = jax.device_get(tree)
    bad = non_finite_leaves(host)
    if bad:
      raise NonFiniteState(f'Refusing to write step {step} to {self.directory}: non-finite '
                           f'values in {bad[:5]}')
    if not self._manager.save(step, args=ocp.args.StandardSave(tree)):
      raise CheckpointError(f'Step {step} was not written to {self.directory}: a step of that '
                            'number is there already (orbax skips it)')
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      files.write_atomic(os.path.join(self.step_dir(step), CHECKSUMS),
                         lambda f: json.dump(checksums(host), f))

  def restore(self, step: int, abstract: Tree) -> Tree:
    """The checked tree of `step`, shaped and placed like `abstract` (arrays or
    ShapeDtypeStructs). Raises CorruptCheckpoint or MismatchedCheckpoint."""
    step_dir = self.step_dir(step)
    expected = _read_checksums(step_dir)
    _check_shapes(step_dir, self._manager.item_metadata(step), abstract)
    try:
      tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except  (TensorStore raises plain Exception)
      raise CorruptCheckpoint(f'{step_dir}: an array file is missing, truncated, corrupt or '
                              f'unreadable ({_first_line(e)})') from e
    _verify(step_dir, jax.device_get(tree), expected)
    return tree

  def check_fits(self, step: int, abstract: Tree) -> None:
    """Raises MismatchedCheckpoint unless the stored names and shapes of `step` are those of
    `abstract`; reads no array."""
    _check_shapes(self.step_dir(step), self._manager.item_metadata(step), abstract)

  def restore_part(self, step: int, abstract: dict[str, Tree]) -> dict[str, Tree]:
    """The checked subtrees of `step` that `abstract` names by their top-level keys (e.g.
    {'params': ...} of a stored train state), as host arrays; nothing else is read."""
    step_dir = self.step_dir(step)
    expected = _read_checksums(step_dir)
    _check_shapes(step_dir, self._manager.item_metadata(step), abstract, part=True)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    try:
      tree = ocp.PyTreeCheckpointer().restore(
          os.path.join(step_dir, _ITEM), args=ocp.args.PyTreeRestore(
              item=abstract, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # pylint: disable=broad-except  (TensorStore raises plain Exception)
      raise CorruptCheckpoint(f'{step_dir}: an array file is missing, truncated, corrupt or '
                              f'unreadable ({_first_line(e)})') from e
    _verify(step_dir, tree, expected)
    return tree

  def read(self, step: int) -> Tree:
    """The stored tree of `step` as host arrays, as stored (no target), checked."""
    step_dir = self.step_dir(step)
    expected = _read_checksums(step_dir)
    try:
      tree = self._manager.restore(step)
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpoint(f'{step_dir}: unreadable ({_first_line(e)})') from e
    host = jax.device_get(tree)
    _verify(step_dir, host, expected)
    return host

  def restore_newest_intact(self, abstract: Tree, log: Callable[[str], None],
                            part: bool = False, move_broken: bool = False) -> tuple[int, Tree]:
    """(step, tree) of the newest step that restores (`restore`, or `restore_part` with
    `part`); each broken newer step is named in a warning through `log` (and, with
    `move_broken`, moved aside: a run that resumes writes those steps again). Raises the last
    error when no step is intact, or at once on a checkpoint of another model."""
    steps = self.complete_steps()
    if not steps:
      raise FileNotFoundError(f'No complete checkpoint in {self.directory}')
    errors = []
    for step in reversed(steps):
      try:
        tree = (self.restore_part if part else self.restore)(step, abstract)
      except CorruptCheckpoint as e:
        errors.append(str(e))
        log(f'Skipping a broken checkpoint: {e}')
        if move_broken:
          self.move_aside(step, log)
        continue
      if errors:
        log(f'Restored {self.step_dir(step)}, the newest intact checkpoint')
      return step, tree
    raise CorruptCheckpoint(f'No intact checkpoint in {self.directory}:\n  ' +
                            '\n  '.join(errors))

  def close(self) -> None:
    self._manager.close()


def _read_checksums(step_dir: str) -> dict[str, int]:
  if not os.path.isdir(step_dir):
    raise CheckpointError(f'{step_dir} is not a directory')
  if not os.listdir(step_dir):
    raise CorruptCheckpoint(f'{step_dir} is empty: not a checkpoint')
  path = os.path.join(step_dir, CHECKSUMS)
  try:
    with open(path) as f:
      return {k: int(v) for k, v in json.load(f).items()}
  except FileNotFoundError:
    raise CorruptCheckpoint(f'{step_dir} lacks {CHECKSUMS}: its write was cut short, or it '
                            'is not a checkpoint of this project') from None
  except (ValueError, AttributeError) as e:
    raise CorruptCheckpoint(f'{path} is unreadable ({_first_line(e)})') from e


def _check_shapes(step_dir: str, metadata: Any, abstract: Tree, part: bool = False) -> None:
  """Stored names and shapes against the model's, before any array is read; with `part`,
  only the stored leaves under the top-level keys of `abstract` count."""
  if metadata is None:
    raise CorruptCheckpoint(f'{step_dir}: its metadata file (default/_METADATA) is missing')
  stored = {name: tuple(m.shape) for name, m in named_leaves(metadata).items()
            if hasattr(m, 'shape')}
  wanted = {name: tuple(a.shape) for name, a in named_leaves(abstract).items()}
  if part:
    stored = {n: s for n, s in stored.items() if n.split('/')[0] in abstract}
  missing = sorted(set(wanted) - set(stored))
  extra = sorted(set(stored) - set(wanted))
  shapes = [f'{n}: stored {stored[n]}, model {wanted[n]}' for n in wanted
            if n in stored and stored[n] != wanted[n]]
  if missing or extra or shapes:
    details = '; '.join(
        ([f'{len(shapes)} shapes differ: ' + '; '.join(shapes[:5])] if shapes else [])
        + ([f'missing {missing[:5]}'] if missing else [])
        + ([f'unexpected {extra[:5]}'] if extra else []))
    raise MismatchedCheckpoint(f'The checkpoint {step_dir} does not fit the model of this '
                               f'config (was it written with another config?): {details}')


def _verify(step_dir: str, host_tree: Tree, expected: dict[str, int]) -> None:
  actual = checksums(host_tree)
  altered = [name for name, crc in actual.items() if name in expected and expected[name] != crc]
  if altered:
    raise CorruptCheckpoint(f'{step_dir}: the arrays {altered[:5]} differ from what was written '
                            '(checksum mismatch: a corrupted file)')
  bad = non_finite_leaves(host_tree)
  if bad:
    raise CorruptCheckpoint(f'{step_dir}: non-finite values in {bad[:5]}')


def resolve_step_dir(path: str) -> str:
  """`path` if it is a step directory (`<dir>/<digits>`), else the newest complete step of the
  checkpoint directory at `path`."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No checkpoint at {path}')
  if os.path.basename(path).isdigit() and os.path.isdir(path):
    return path
  checkpoints = CheckpointDir(path)
  try:
    steps = checkpoints.complete_steps()
  finally:
    checkpoints.close()
  if not steps:
    raise FileNotFoundError(f'No complete checkpoint step in {path}')
  return os.path.join(path, str(steps[-1]))


def read_tree(step_dir: str) -> Tree:
  """The stored tree of a step directory as host arrays, without a target (for pretrained
  weights), checked like `CheckpointDir.restore` except for the shapes."""
  step_dir = os.path.abspath(step_dir)
  checkpoints = CheckpointDir(os.path.dirname(step_dir))
  try:
    return checkpoints.read(int(os.path.basename(step_dir)))
  finally:
    checkpoints.close()
