"""Files written whole or not at all, and the settings a folder was made with.

`write_atomic` writes to a temporary sibling and renames it over the target, so that a reader
(or a process killed mid-write) never sees half a file. `check_settings` is the one rule for
folders that results are reused from (a toy set, a pretraining phase, a feature export, a
run's workdir): reused only with the settings that made them, otherwise refused naming the
keys that differ.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import IO, Any


def write_atomic(path: str, write: Callable[[IO], None], mode: str = 'w',
                 sync: bool = False) -> None:
  """Calls `write(file)` on a temporary file, then renames it to `path`; `sync` flushes it to
  the disk first (for files that must survive a power cut, not only a killed process)."""
  tmp = f'{path}.tmp'
  with open(tmp, mode) as f:
    write(f)
    if sync:
      f.flush()
      os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, content: Any) -> None:
  """`content` as indented JSON, atomically."""
  write_atomic(path, lambda f: json.dump(content, f, indent=1))


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


def as_json(value: Any) -> Any:
  """`value` as JSON reads it back (tuples as lists), for comparisons with a file's."""
  return json.loads(json.dumps(value))


def _short(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 40 else '...'


def check_settings(recorded: dict[str, Any], wanted: dict[str, Any], what: str,
                   remedy: str, prefix: str = '') -> None:
  """Raises a ValueError naming the keys (up to eight, as `prefix` + key, with the recorded
  and the wanted value) in which `wanted` differs from the `recorded` settings of `what`."""
  recorded, wanted = flatten(as_json(recorded)), flatten(as_json(wanted))
  differ = differing_keys(recorded, wanted)
  if differ:
    names = ', '.join(f'{prefix}{k}={_short(recorded.get(k))} (now {_short(wanted.get(k))})'
                      for k in differ[:8]) + (', ...' if len(differ) > 8 else '')
    raise ValueError(f'{what} was made with other settings: {names}; {remedy}')
