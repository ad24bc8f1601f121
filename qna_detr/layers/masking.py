"""Padding masks through local layers: which pixels exist, and which windows see any."""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def valid_from_padding(padding_mask: Optional[Array], shape: Sequence[int]) -> Array:
  """[B, H, W] bool, True where a pixel is real; all True when no mask is given."""
  if padding_mask is None:
    return jnp.ones(tuple(shape[:3]), bool)
  if tuple(padding_mask.shape) != tuple(shape[:3]):
    raise ValueError(f'padding_mask must have shape {tuple(shape[:3])} (the input\'s [B, H, W]), '
                     f'got {tuple(padding_mask.shape)}.')
  return ~padding_mask.astype(bool)


def window_any(valid: Array, kernel_size: int, stride: int) -> Array:
  """Whether each 'same'-padded k x k window (centred every stride pixels) holds a valid pixel."""
  pad = (kernel_size - 1) // 2
  return jax.lax.reduce_window(
      valid, False, jax.lax.bitwise_or,
      window_dimensions=(1, kernel_size, kernel_size),
      window_strides=(1, stride, stride),
      padding=((0, 0), (pad, pad), (pad, pad)))


def downsample(padding_mask: Array, stride: int) -> Array:
  """The mask of a stride-s output whose pixel i is anchored at input pixel s * i.

  An image of height h alone gives ceil(h / s) output rows; inside a padded batch exactly those
  rows stay unmasked, so a padded batch matches its images run one by one.
  """
  return padding_mask[:, ::stride, ::stride]
