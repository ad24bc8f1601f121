"""WORKDIR/config.json: a run's resolved config and what its data told it, for the tools.

Written when a run starts (`save_config`: the config as the run uses it, overrides included)
and completed once the data is read (`save_dataset`: class names, category ids, bucket
shapes). Every tool reads it (`load`), so `--config` is optional for them; a config given
anyway must be the run's, or the error names the keys that differ.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections

CONFIG_FILE = 'config.json'
logger = logging.getLogger(__name__)


def _path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def has_config(workdir: str) -> bool:
  return os.path.isfile(_path(workdir))


def _read(workdir: str) -> dict[str, Any]:
  path = _path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No {CONFIG_FILE} in {workdir}: is it the workdir of a training '
                            'run? (Or pass --config.)')
  with open(path) as f:
    return json.load(f)


def _write(workdir: str, content: dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = _path(workdir)
  with open(path + '.tmp', 'w') as f:
    json.dump(content, f, indent=1)
  os.replace(path + '.tmp', path)


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as JSON reads it back (tuples as lists)."""
  return json.loads(config.to_json())


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b': leaf} of nested dicts."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {name: leaf for key, value in tree.items()
          for name, leaf in flatten(value, f'{prefix}.{key}' if prefix else key).items()}


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """The dotted keys whose values differ between two nested dicts (either may lack one)."""
  flat_a, flat_b = flatten(a), flatten(b)
  return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config a run starts with; a resumed run with another config is told which
  keys changed."""
  content = {'config': _plain(config)}
  if os.path.isfile(_path(workdir)):
    previous = _read(workdir)
    changed = differing_keys(previous['config'], content['config'])
    if changed:
      logger.warning('The config differs from the one this workdir was started with, in '
                     'config.%s', ', config.'.join(changed[:10]))
    content = {**previous, **content}
  _write(workdir, content)


def save_dataset(workdir: str, train: Any, val: Any) -> None:
  """Adds the class names and category ids, and both splits' bucket shapes (the evaluation
  ones are those inference uses)."""
  content = _read(workdir) if os.path.isfile(_path(workdir)) else {}
  content['dataset'] = {'class_names': list(train.class_names),
                        'category_ids': list(train.category_ids),
                        'train_bucket_shapes': [list(s) for s in train.bucket_shapes],
                        'eval_bucket_shapes': [list(s) for s in val.bucket_shapes]}
  _write(workdir, content)


def load(workdir: str, given: ml_collections.ConfigDict | None = None
         ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(the run's config, its 'dataset' entry). A `given` config (a tool's --config, prepared
  the way the run prepared its own) must equal the saved one."""
  content = _read(workdir)
  if given is not None:
    changed = differing_keys(content['config'], _plain(given))
    if changed:
      raise ValueError(f'--config differs from the config of the run in {workdir} '
                       f'({_path(workdir)}) in config.{", config.".join(changed[:10])}; '
                       'leave --config out to use the run\'s own')
  return ml_collections.ConfigDict(content['config']), content.get('dataset', {})
