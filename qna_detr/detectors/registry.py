"""Detector builders by name, as `config.model.name` refers to them.

A builder takes the experiment config (`model`, and the other sections it documents) and the
number of classes, and returns a `DetectorDef`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qna_detr.detectors.base import DetectorDef

Builder = Callable[[Any, int], DetectorDef]
_BUILDERS: dict[str, Builder] = {}


def register(name: str, builder: Builder) -> None:
  """Adds a detector builder under `name`; a name is registered once."""
  if name in _BUILDERS:
    raise ValueError(f'A detector named {name!r} is already registered')
  _BUILDERS[name] = builder


def names() -> list[str]:
  return sorted(_BUILDERS)


def build(config: Any, num_classes: int) -> DetectorDef:
  """The detector `config.model.name` names, for `num_classes` object classes."""
  name = config.model.name
  if name not in _BUILDERS:
    raise ValueError(f'config.model.name={name!r} is not a registered detector; choose one of '
                     f'{names()}.')
  return _BUILDERS[name](config, num_classes)
