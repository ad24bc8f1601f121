"""The contract between backbones and detection heads, and the compute dtypes they take."""
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


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype:
  """The dtype `config.model.dtype` names; parameters stay float32 whatever it is."""
  if name not in DTYPES:
    raise ValueError(f'config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}.')
  return DTYPES[name]


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
