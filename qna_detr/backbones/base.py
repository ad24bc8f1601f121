"""The contract between backbones and detection heads."""
from typing import NamedTuple

import jax


class FeatureMap(NamedTuple):
  """One level of a backbone's feature pyramid.

  Detection batches pad images of different sizes to one shape; the mask travels with every
  feature map so that heads can ignore (and never attend to) padded positions.
  """
  features: jax.Array  # [B, h, w, C]
  mask: jax.Array  # [B, h, w] bool, True where the position is padding.
