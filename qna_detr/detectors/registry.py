"""Detectors by name, as `config.model.name` refers to them.

An entry is a builder, which takes the experiment config (`model`, and the other sections it
documents) and the number of classes and returns a `DetectorDef`, and a check of the config
keys the detector reads, run before anything else when a run starts (errors name the key).

Detectors and backbones of one's own live in any importable module that calls `register`;
`config.imports` names such modules, imported before the registries are read (by the run and
by every tool that reads the run's config.json), so that the project needs no edit for them.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from qna_detr.backbones import registry as backbones
from qna_detr.detectors.base import DetectorDef
from qna_detr.utils.registry import Registry

Builder = Callable[[Any, int], DetectorDef]
Check = Callable[[Any], None]


def _no_check(config: Any) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class DetectorEntry:
  build: Builder
  check: Check = _no_check


_REGISTRY: Registry[DetectorEntry] = Registry('detector', 'config.model.name')


def register(name: str, builder: Builder, check: Check = _no_check) -> None:
  """Adds a detector under `name`: its builder and the check of its config keys."""
  _REGISTRY.register(name, DetectorEntry(builder, check))


def names() -> list[str]:
  return _REGISTRY.names()


def import_plugins(config: Any) -> None:
  """Imports the modules `config.imports` names (they register their entries)."""
  for name in config.get('imports', ()):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(f'config.imports: cannot import {name!r} ({e}); is its folder on '
                        'PYTHONPATH?') from None


def check(config: Any) -> None:
  """The config's detector and backbone exist, and each accepts the keys it reads."""
  import_plugins(config)
  entry = _REGISTRY.get(config.model.name)
  backbones.check(config.model)
  entry.check(config)


def build(config: Any, num_classes: int) -> DetectorDef:
  """The detector `config.model.name` names, for `num_classes` object classes."""
  import_plugins(config)
  return _REGISTRY.get(config.model.name).build(config, num_classes)
