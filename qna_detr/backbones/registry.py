"""Backbones by name, as `config.model.backbone` and the tools refer to them.

An entry builds the feature extractor (a linen module returning `FeatureMap`s, see `base`)
from the model config, reading the keys it knows (`dtype` for all; each entry documents its
own), and says what else the project needs of it: its classifier (for ImageNet checkpoints
and parameter counts), the pretrained-weight formats it reads (`weights.FORMATS`), and which
of its parameters a detector keeps fixed. The built-in entries register when
`qna_detr.backbones` is imported; a new backbone is one module that calls `register`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from qna_detr.utils.registry import Registry

ModelConfig = Mapping[str, Any]  # config.model, or any mapping with the keys an entry reads.


def _nothing_frozen(path: tuple[str, ...]) -> bool:
  del path
  return False


def _no_check(model_config: ModelConfig) -> None:
  del model_config


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
  """How to build one backbone, and what the project needs to know about it.

  Attributes:
    build: model config -> the feature extractor.
    build_classifier: (model config, classes) -> the backbone under 'backbone' with an
      ImageNet-style head, or None.
    weight_formats: names of the pretrained-weight formats it reads (see `weights.FORMATS`).
    frozen: whether a parameter (its path inside the backbone's tree) stays fixed while a
      detector trains, as the backbone's reference recipe keeps it.
    released_params: parameter count of the reference ImageNet classifier (1000 classes,
      224 x 224), for `tools/model_summary.py`; None if there is none.
    description: one line for listings.
    check: raises a ValueError naming the `config.model` key it reads that is wrong, before
      a run starts.
    buffer: whether a leaf (its path inside the backbone's tree) is what the reference keeps
      as a buffer rather than a parameter (a frozen batch norm's folded statistics), so that
      parameter counts compare with the reference's.
  """
  build: Callable[[ModelConfig], nn.Module]
  build_classifier: Callable[[ModelConfig, int], nn.Module] | None = None
  weight_formats: tuple[str, ...] = ('qna_detr',)
  frozen: Callable[[tuple[str, ...]], bool] = _nothing_frozen
  released_params: int | None = None
  description: str = ''
  check: Callable[[ModelConfig], None] = _no_check
  buffer: Callable[[tuple[str, ...]], bool] = _nothing_frozen


_REGISTRY: Registry[BackboneEntry] = Registry('backbone', 'config.model.backbone')


def register(name: str, entry: BackboneEntry) -> None:
  """Adds a backbone under `name`; a name is registered once."""
  _REGISTRY.register(name, entry)


def names() -> list[str]:
  return _REGISTRY.names()


def get(name: str) -> BackboneEntry:
  return _REGISTRY.get(name)


def check(model_config: ModelConfig) -> None:
  """The backbone `model_config['backbone']` exists and accepts the keys it reads."""
  get(model_config['backbone']).check(model_config)


def build(model_config: ModelConfig) -> nn.Module:
  """The feature extractor `model_config['backbone']` names."""
  return get(model_config['backbone']).build(model_config)


def build_classifier(model_config: ModelConfig, num_classes: int) -> nn.Module:
  """The backbone with its classification head, its parameters under 'backbone'."""
  entry = get(model_config['backbone'])
  if entry.build_classifier is None:
    raise ValueError(f'The backbone {model_config["backbone"]!r} has no classifier')
  return entry.build_classifier(model_config, num_classes)
