"""A run's workdir as the tools and the Detector API read it: WORKDIR/config.json, the
checkpoints, and the trained detector they make.

config.json holds the resolved config (overrides included) and what the data told the run
(class names, category ids, bucket shapes). It is written when a run starts (`save_config`)
and completed once the data is read (`save_dataset`); every tool reads it (`load_config`), so
`--config` is optional for them, and a config given anyway must be the run's, or the error
names the keys that differ.

Workdirs are relocatable: a path setting (`PATH_KEYS`) that points inside the workdir is
stored relative to it, any other as an absolute path, and a relative one is read against the
workdir's location. A workdir (with the toy set it made) can be moved or copied and every
tool still finds its files, from any directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from typing import Any

import jax
import ml_collections

from qna_detr import detectors
from qna_detr.data import toy
from qna_detr.utils import checkpoint_io
from qna_detr.utils import files

logger = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'
# The config's path settings.
PATH_KEYS = ('dataset.data_dir', 'dataset.train_json', 'dataset.train_images',
             'dataset.val_json', 'dataset.val_images', 'toy_data.data_dir', 'pretrained.path')


def _config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def has_config(workdir: str) -> bool:
  return os.path.isfile(_config_path(workdir))


def has_checkpoint(workdir: str) -> bool:
  """Whether the workdir holds a training checkpoint (a run to resume)."""
  directory = os.path.join(workdir, CHECKPOINTS)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _map_paths(content: dict[str, Any], fn) -> dict[str, Any]:
  """A copy of a config dict with every non-empty path setting `p` replaced by `fn(p)`."""
  content = json.loads(json.dumps(content))
  for key in PATH_KEYS:
    section, name = key.split('.')
    if content.get(section, {}).get(name):
      content[section][name] = fn(content[section][name])
  return content


def portable(config: ml_collections.ConfigDict | dict, workdir: str) -> dict[str, Any]:
  """The config as config.json stores it: paths inside `workdir` relative to it, others
  absolute (relative ones taken from the current directory, as the run read them)."""
  root = os.path.abspath(workdir)

  def store(path: str) -> str:
    path = os.path.abspath(path)
    inside = os.path.commonpath([root, path]) == root
    return os.path.relpath(path, root) if inside else path

  content = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  return _map_paths(content, store)


def _resolved(content: dict[str, Any], workdir: str) -> dict[str, Any]:
  """The stored config with its relative paths joined to the workdir's location."""
  root = os.path.abspath(workdir)
  return _map_paths(content, lambda p: p if os.path.isabs(p) else os.path.join(root, p))


def _read(workdir: str) -> dict[str, Any]:
  path = _config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No {CONFIG_FILE} in {workdir}: is it the workdir of a training '
                            'run? (Or pass --config.)')
  with open(path) as f:
    return json.load(f)


def _write(workdir: str, content: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.write_json(_config_path(workdir), content)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config a run starts with; a resumed run with another config is told which
  keys changed."""
  content = {'config': portable(config, workdir)}
  if has_config(workdir):
    previous = _read(workdir)
    changed = files.differing_keys(previous['config'], content['config'])
    if changed:
      logger.warning('The config differs from the one this workdir was started with, in '
                     'config.%s', ', config.'.join(changed[:10]))
    content = {**previous, **content}
  _write(workdir, content)


def save_classes(workdir: str, class_names, category_ids, train_bucket_shapes,
                 eval_bucket_shapes) -> None:
  """Adds the class names and category ids, and both splits' bucket shapes (the evaluation
  ones are those inference uses)."""
  content = _read(workdir) if has_config(workdir) else {}
  content['dataset'] = {'class_names': list(class_names),
                        'category_ids': [int(c) for c in category_ids],
                        'train_bucket_shapes': [list(s) for s in train_bucket_shapes],
                        'eval_bucket_shapes': [list(s) for s in eval_bucket_shapes]}
  _write(workdir, content)


def save_dataset(workdir: str, train: Any, val: Any) -> None:
  """`save_classes` of the training split's classes and both splits' bucket shapes."""
  save_classes(workdir, train.class_names, train.category_ids, train.bucket_shapes,
               val.bucket_shapes)


def load_config(workdir: str, given: ml_collections.ConfigDict | None = None
                ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(the run's config, with its paths resolved; its 'dataset' entry). A `given` config
  (a tool's --config) must equal the saved one once its toy set's paths are filled in as the
  run filled them; it is used alone where the workdir has no config.json."""
  if given is not None:
    given = toy.resolve(given, workdir)
    if not has_config(workdir):
      return given, {}
  content = _read(workdir)
  if given is not None:
    files.check_settings(
        content['config'], portable(given, workdir), f'The run in {workdir}',
        "--config differs from the run's own config.json; leave --config out to use the run's",
        prefix='config.')
  return (ml_collections.ConfigDict(_resolved(content['config'], workdir)),
          content.get('dataset', {}))


def find_checkpoint(workdir: str, checkpoint: str | None = None) -> str | None:
  """The step directory `--checkpoint` names (checked), or None for the workdir's newest
  intact one."""
  if not checkpoint:
    if not os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
      raise FileNotFoundError(f'No checkpoint in {os.path.join(workdir, CHECKPOINTS)} (train '
                              'first, or pass --checkpoint).')
    return None
  step_name = os.path.basename(os.path.normpath(checkpoint))
  if not os.path.isdir(checkpoint) or not step_name.isdigit():
    raise FileNotFoundError(f'--checkpoint={checkpoint} is not a checkpoint step directory '
                            f'(WORKDIR/{CHECKPOINTS}/<step>).')
  return os.path.abspath(checkpoint)


def load_params(workdir: str, checkpoint: str | None, detector: detectors.DetectorDef,
                config: ml_collections.ConfigDict) -> tuple[str, Any]:
  """(step directory, the parameters evaluation reads: the moving average where the config
  keeps one) of the step `checkpoint` names, else of the newest intact one (broken newer
  ones named in a warning). Only those parameters are read, as host arrays, checked."""
  step_dir = find_checkpoint(workdir, checkpoint)
  directory = os.path.dirname(step_dir) if step_dir else os.path.join(workdir, CHECKPOINTS)
  part = 'ema_params' if config.ema_decay > 0 else 'params'
  abstract = {part: detector.abstract_params()}
  states = checkpoint_io.CheckpointDir(directory)
  try:
    if step_dir:
      return step_dir, states.restore_part(int(os.path.basename(step_dir)), abstract)[part]
    step, tree = states.restore_newest_intact(abstract, logger.warning, part=True)
    return states.step_dir(step), tree[part]
  finally:
    states.close()


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A trained detector as its workdir holds it: what inference and export need."""
  config: ml_collections.ConfigDict
  detector: detectors.DetectorDef
  params: Any  # Host arrays: the parameters evaluation reads.
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  eval_bucket_shapes: tuple[tuple[int, int], ...]
  step_dir: str


def load_run(workdir: str, checkpoint: str | None = None,
             config: ml_collections.ConfigDict | None = None) -> TrainedRun:
  """The run in `workdir` (its config.json) at `checkpoint` (a step directory; default: the
  newest intact one). A `config` given must be the run's."""
  config, dataset = load_config(workdir, config)
  if 'class_names' not in dataset:
    raise ValueError(f'{_config_path(workdir)} does not say the classes of the run (it stopped '
                     'before reading its data): train first')
  detector = detectors.build(config, len(dataset['class_names']))
  step_dir, params = load_params(workdir, checkpoint, detector, config)
  return TrainedRun(config, detector, params, tuple(dataset['class_names']),
                    tuple(int(c) for c in dataset['category_ids']),
                    tuple(tuple(int(v) for v in s) for s in dataset['eval_bucket_shapes']),
                    step_dir)


LOCK_FILE = 'run.lock'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def locked(workdir: str):
  """Holds WORKDIR/run.lock (host and pid) while a run uses the workdir (process 0 of a
  multi-process run takes it for all): a second start is refused naming the holder; a lock
  left by a process of this host that is gone is taken over with a warning."""
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  mine = {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S')}
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      holder = _read_lock(path)
      if holder.get('host') == mine['host'] and not _alive(int(holder.get('pid', -1))):
        logger.warning('Taking over %s from pid %s of this host, which is gone', path,
                       holder.get('pid'))
        os.remove(path)
        continue
      raise RuntimeError(f'{path}: another run uses this workdir (host {holder.get("host")}, '
                         f'pid {holder.get("pid")}, started {holder.get("started")}); stop it '
                         'or use another --workdir') from None
    with os.fdopen(fd, 'w') as f:
      json.dump(mine, f)
    break
  try:
    yield
  finally:
    if _read_lock(path).get('pid') == mine['pid']:
      os.remove(path)


def _read_lock(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}
