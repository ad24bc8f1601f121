"""Backbones by name, as configs and tools refer to them."""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from qna_detr.backbones.qna_vit import VARIANTS, QnAViT, QnAViTClassifier


def names() -> list[str]:
  return sorted(VARIANTS)


def _spec(name: str):
  if name not in VARIANTS:
    raise ValueError(f'Unknown backbone {name!r}; choose one of {names()}.')
  return VARIANTS[name]


def build_backbone(name: str, *, dtype: jnp.dtype = jnp.float32,
                   drop_path: Optional[float] = None) -> nn.Module:
  """A feature extractor returning FeatureMaps at strides 4, 8, 16, 32."""
  return QnAViT(_spec(name), drop_path, dtype)


def build_classifier(name: str, num_classes: int, *, dtype: jnp.dtype = jnp.float32,
                     drop_path: Optional[float] = None) -> nn.Module:
  """The backbone with its ImageNet-style classification head."""
  return QnAViTClassifier(_spec(name), num_classes, drop_path, dtype)
