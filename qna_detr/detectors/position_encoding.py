"""Two-dimensional sine position encoding (DETR's `PositionEmbeddingSine`).

Coordinates are counted over the non-padded pixels only and normalized by the image's own valid
height and width, so an image padded at the bottom and right gets, on its valid region, exactly
the encoding it would get alone: predictions must not depend on how much a batch pads it.
"""
import math

import jax
import jax.numpy as jnp

# Keeps the normalization finite in columns (rows) that are padding throughout.
_EPS = 1e-6


def sine_position_encoding(mask: jax.Array, num_pos_feats: int = 128, *,
                           temperature: float = 10000.0,
                           scale: float = 2 * math.pi) -> jax.Array:
  """Encodes the valid pixels of a padded batch.

  Args:
    mask: `[B, h, w]` bool, True where the position is padding.
    num_pos_feats: channels per axis (half the model width); must be even.
    temperature: base of the geometric frequency progression.
    scale: range of the normalized coordinates, `(0, scale]`.

  Returns:
    `[B, h, w, 2 * num_pos_feats]` float32: the y encoding then the x encoding, each with
    interleaved sin/cos channels. Padded positions get arbitrary (finite) values.
  """
  if mask.ndim != 3:
    raise ValueError(f'mask must be [B, h, w], got shape {mask.shape}')
  if num_pos_feats <= 0 or num_pos_feats % 2:
    raise ValueError(f'num_pos_feats must be a positive even number, got {num_pos_feats}')
  not_mask = jnp.logical_not(mask).astype(jnp.float32)
  y_embed = jnp.cumsum(not_mask, axis=1)
  x_embed = jnp.cumsum(not_mask, axis=2)
  y_embed = y_embed / (y_embed[:, -1:, :] + _EPS) * scale
  x_embed = x_embed / (x_embed[:, :, -1:] + _EPS) * scale

  exponents = 2 * (jnp.arange(num_pos_feats) // 2) / num_pos_feats
  dim_t = jnp.asarray(temperature, jnp.float32) ** exponents.astype(jnp.float32)

  def encode(embed: jax.Array) -> jax.Array:
    angles = embed[..., None] / dim_t  # [B, h, w, F]; pairs of channels share a frequency.
    interleaved = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
    return interleaved.reshape(*angles.shape)

  return jnp.concatenate([encode(y_embed), encode(x_embed)], axis=-1)
