"""The contract between backbones and detection heads."""
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class FeatureMap(NamedTuple):
  """One level of a backbone's feature pyramid.

  Detection batches pad images of different sizes to one shape; the mask travels with every
  feature map so that heads can ignore (and never attend to) padded positions.
  """
  features: jax.Array  # [B, h, w, C]
  mask: jax.Array  # [B, h, w] bool, True where the position is padding.


_PROBE = 128  # Side of the input whose output shapes give a backbone's strides.


def abstract_init(backbone: nn.Module) -> tuple[list[FeatureMap], Any]:
  """(feature pyramid, parameters) of the backbone as shapes, without computing anything."""
  images = jax.ShapeDtypeStruct((1, _PROBE, _PROBE, 3), jnp.float32)
  pyramid, variables = jax.eval_shape(backbone.init_with_output, jax.random.PRNGKey(0), images)
  return pyramid, variables['params']


def pyramid_levels(backbone: nn.Module) -> dict[int, int]:
  """{stride: channels} of the backbone's feature maps, in pyramid order."""
  return {_PROBE // level.features.shape[1]: level.features.shape[-1]
          for level in abstract_init(backbone)[0]}
