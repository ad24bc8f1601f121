"""A registry of named entries (the backbones, the detectors): each name registered once,
looked up with an error that names the config key and the choices."""
from __future__ import annotations

from typing import Generic, TypeVar

Entry = TypeVar('Entry')


class Registry(Generic[Entry]):
  """Entries by name; `key` is the config key that names one (for error messages)."""

  def __init__(self, kind: str, key: str):
    self._kind, self._key = kind, key
    self._entries: dict[str, Entry] = {}

  def register(self, name: str, entry: Entry) -> None:
    if name in self._entries:
      raise ValueError(f'A {self._kind} named {name!r} is already registered')
    self._entries[name] = entry

  def names(self) -> list[str]:
    return sorted(self._entries)

  def get(self, name: str) -> Entry:
    if name not in self._entries:
      raise ValueError(f'{self._key}={name!r} is not a registered {self._kind}; choose one of '
                       f'{self.names()}.')
    return self._entries[name]
