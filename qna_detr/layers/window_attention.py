"""Windowed multi-head self-attention with a learned relative position bias (Swin-style).

Detection inputs come in any H x W: the map is padded bottom/right to a multiple of the window
and the pad is masked out of every key set together with the image padding, so a padded batch
gives each image the same windows it would get alone.
"""
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qna_detr.layers import masking

Array = jax.Array


def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] index into a (2w-1)^2 bias table for every (query, key) pair of a window."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + window - 1  # [2, w*w, w*w], in [0, 2w-2]
  return rel[0] * (2 * window - 1) + rel[1]


def _to_windows(x: Array, window: int) -> Array:
  """[B, H, W, ...] (H, W multiples of window) -> [B * nH * nW, window * window, ...]."""
  b, hgt, wid = x.shape[:3]
  rest = x.shape[3:]
  x = x.reshape(b, hgt // window, window, wid // window, window, *rest)
  x = jnp.moveaxis(x, 2, 3)
  return x.reshape(-1, window * window, *rest)


def _from_windows(x: Array, window: int, batch: int, hgt: int, wid: int) -> Array:
  rest = x.shape[2:]
  x = x.reshape(batch, hgt // window, wid // window, window, window, *rest)
  return jnp.moveaxis(x, 3, 2).reshape(batch, hgt, wid, *rest)


class WindowAttention(nn.Module):
  """Self-attention inside non-overlapping window x window tiles.

  Attributes:
    features: channels (input and output).
    heads: attention heads; features must divide by it.
    window: tile side.
    dtype: compute dtype; logits and softmax run in float32.
  """
  features: int
  heads: int
  window: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None) -> Array:
    """x: [B, H, W, C]; padding_mask: [B, H, W] bool, True = padded (never attended to)."""
    if self.features % self.heads:
      raise ValueError(f'features ({self.features}) must be a multiple of heads ({self.heads}).')
    if self.window < 1:
      raise ValueError(f'window must be >= 1, got {self.window}.')
    if x.ndim != 4:
      raise ValueError(f'x must have rank 4 [B, H, W, C], got shape {x.shape}.')
    valid = masking.valid_from_padding(padding_mask, x.shape)
    b, hgt, wid, _ = x.shape
    w, nh = self.window, self.heads
    hd = self.features // nh
    pad_h, pad_w = -hgt % w, -wid % w
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    valid = jnp.pad(valid, ((0, 0), (0, pad_h), (0, pad_w)))

    qkv = nn.Dense(3 * self.features, use_bias=False, dtype=self.dtype,
                   kernel_init=self.kernel_init, name='to_qkv')(x)
    # Per-head [q | k | v] layout, as in the released QnA-ViT checkpoints.
    qkv = _to_windows(qkv.reshape(*qkv.shape[:3], nh, 3 * hd), w)
    q, k, v = jnp.split(qkv, 3, axis=-1)  # [n, w*w, h, d]
    key_valid = _to_windows(valid, w)  # [n, w*w]

    table = self.param('rpe_bias', nn.initializers.zeros, ((2 * w - 1) ** 2, nh))
    bias = table[relative_position_index(w)].transpose(2, 0, 1)  # [h, w*w, w*w]
    logits = jnp.einsum('nqhd,nkhd->nhqk', q / np.sqrt(hd).astype(q.dtype), k,
                        preferred_element_type=jnp.float32) + bias
    logits = jnp.where(key_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('nhqk,nkhd->nqhd', attn, v).reshape(-1, w * w, self.features)
    out = _from_windows(out, w, b, hgt + pad_h, wid + pad_w)[:, :hgt, :wid]
    return nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                    kernel_init=self.kernel_init, name='to_out')(out)
