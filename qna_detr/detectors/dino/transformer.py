"""DINO's deformable transformer pieces (IDEA-Research/DINO `deformable_transformer.py`): the
encoder and decoder layers, the reference points and valid ratios of padded levels, the
sine codes of anchor boxes and the encoder's proposals.

Post-norm layers, LayerNorm epsilon 1e-5 and ReLU, as the reference; Dense kernels start
from Xavier-uniform as its `_reset_parameters` leaves them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qna_detr.layers.deformable_attention import MSDeformAttn

Array = jax.Array
Shapes = tuple[tuple[int, int], ...]
LN_EPS = 1e-5


def dense(features: int, name: str, dtype, **kwargs) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=kwargs.pop('kernel_init', nn.initializers.xavier_uniform()),
                  **kwargs)


class MLP(nn.Module):
  """Dense layers with ReLU between them (the reference's `MLP`)."""
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: jnp.dtype = jnp.float32
  zero_last: bool = False  # The box heads' last layer starts at zero, as the reference's.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      init = {'kernel_init': nn.initializers.zeros} if last and self.zero_last else {}
      x = dense(self.output_dim if last else self.hidden_dim, f'layer_{i}', self.dtype,
                **init)(x)
      if not last:
        x = nn.relu(x)
    return x


class _FeedForward(nn.Module):
  """`norm(x + linear2(dropout(relu(linear1(x)))))` (with dropout on the branch)."""
  d_model: int
  dim_feedforward: int
  dropout: float
  dtype: jnp.dtype
  norm_name: str

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    h = nn.relu(dense(self.dim_feedforward, 'linear1', self.dtype)(x))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Dropout(self.dropout)(dense(self.d_model, 'linear2', self.dtype)(h),
                                 deterministic=not train)
    return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=self.norm_name)(x + h)


class _Layer(nn.Module):
  """Sizes and the deformable attention shared by the encoder and decoder layers."""
  d_model: int
  num_heads: int
  num_levels: int
  num_points: int
  dim_feedforward: int
  dropout: float
  dtype: jnp.dtype = jnp.float32
  implementation: str = 'auto'

  def deformable(self, name: str) -> MSDeformAttn:
    return MSDeformAttn(self.d_model, self.num_levels, self.num_heads, self.num_points,
                        self.dtype, self.implementation, name=name)


class EncoderLayer(_Layer):
  """Deformable self-attention over every level's tokens, then the feed-forward block."""

  @nn.compact
  def __call__(self, src: Array, pos: Array, reference_points: Array, shapes: Shapes,
               padding_mask: Array, *, train: bool) -> Array:
    attended = self.deformable('self_attn')(src + pos, reference_points, src, shapes,
                                            padding_mask)
    attended = nn.Dropout(self.dropout)(attended, deterministic=not train)
    src = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm1')(src + attended)
    return _FeedForward(self.d_model, self.dim_feedforward, self.dropout, self.dtype,
                        norm_name='norm2', name='ffn')(src, train=train)


class DecoderLayer(_Layer):
  """Self-attention among the queries (under `blocked`), deformable cross-attention to the
  levels around each query's anchor box, feed-forward (the reference's order sa, ca, ffn)."""

  @nn.compact
  def __call__(self, tgt: Array, query_pos: Array, reference_points: Array, memory: Array,
               shapes: Shapes, memory_mask: Array, blocked: Array | None, *,
               train: bool) -> Array:
    q = k = tgt + query_pos
    mask = None if blocked is None else ~blocked[None, None]
    attended = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.dropout,
        kernel_init=nn.initializers.xavier_uniform(), force_fp32_for_softmax=True,
        name='self_attn')(q, k, tgt, mask=mask, deterministic=not train)
    attended = nn.Dropout(self.dropout)(attended, deterministic=not train)
    tgt = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm2')(tgt + attended)
    attended = self.deformable('cross_attn')(tgt + query_pos, reference_points, memory, shapes,
                                             memory_mask)
    attended = nn.Dropout(self.dropout)(attended, deterministic=not train)
    tgt = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm1')(tgt + attended)
    return _FeedForward(self.d_model, self.dim_feedforward, self.dropout, self.dtype,
                        norm_name='norm3', name='ffn')(tgt, train=train)


def valid_ratios(masks: Sequence[Array]) -> Array:
  """[B, L, 2] (width, height) fraction of each level that is not padding, read off its
  first row and column (the reference's `get_valid_ratio`)."""
  ratios = []
  for mask in masks:
    height, width = mask.shape[1:]
    valid_h = (~mask[:, :, 0]).sum(1).astype(jnp.float32) / height
    valid_w = (~mask[:, 0, :]).sum(1).astype(jnp.float32) / width
    ratios.append(jnp.stack([valid_w, valid_h], -1))
  return jnp.stack(ratios, 1)


def encoder_reference_points(shapes: Shapes, ratios: Array) -> Array:
  """[B, S, L, 2]: every token's cell centre, normalized to its image's valid extent, then
  mapped onto each level through its valid ratios."""
  points = []
  for level, (height, width) in enumerate(shapes):
    y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5,
                        jnp.arange(width, dtype=jnp.float32) + 0.5, indexing='ij')
    y = y.reshape(-1)[None] / (ratios[:, None, level, 1] * height)
    x = x.reshape(-1)[None] / (ratios[:, None, level, 0] * width)
    points.append(jnp.stack([x, y], -1))
  return jnp.concatenate(points, 1)[:, :, None] * ratios[:, None]


def sine_box_embedding(boxes: Array, num_pos_feats: int) -> Array:
  """[..., 4 * num_pos_feats] sine codes of (cx, cy, w, h) in [0, 1], in the order y, x, w, h
  (the reference's `gen_sineembed_for_position`, which fixes num_pos_feats = 128)."""
  dim_t = 10000.0 ** (2 * (jnp.arange(num_pos_feats) // 2) / num_pos_feats)

  def encode(coordinate):
    angles = coordinate[..., None] * (2 * math.pi) / dim_t
    return jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])],
                     -1).reshape(*angles.shape)

  x, y, w, h = (boxes[..., i] for i in range(4))
  return jnp.concatenate([encode(y), encode(x), encode(w), encode(h)], -1)


def encoder_proposals(memory: Array, masks: Sequence[Array]) -> tuple[Array, Array]:
  """(memory with padded and unusable tokens zeroed [B, S, D], inverse-sigmoid proposals
  [B, S, 4]): a box per token, centred on its cell (normalized to the valid extent), 0.05 x
  2^level wide; +inf for padded tokens and proposals not inside (0.01, 0.99) (the
  reference's `gen_encoder_output_proposals`)."""
  proposals, padded = [], []
  for level, mask in enumerate(masks):
    batch, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).astype(jnp.float32)
    valid_w = (~mask[:, 0, :]).sum(1).astype(jnp.float32)
    y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing='ij')
    centre = jnp.stack([(x[None] + 0.5) / valid_w[:, None, None],
                        (y[None] + 0.5) / valid_h[:, None, None]], -1)
    size = jnp.full_like(centre, 0.05 * 2.0 ** level)
    proposals.append(jnp.concatenate([centre, size], -1).reshape(batch, -1, 4))
    padded.append(mask.reshape(batch, -1))
  proposals, padded = jnp.concatenate(proposals, 1), jnp.concatenate(padded, 1)
  usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1)
  inside = jnp.clip(proposals, 0.01, 0.99)  # Logs of the unusable ones are not read.
  logits = jnp.where((padded | ~usable)[..., None], jnp.inf, jnp.log(inside / (1 - inside)))
  memory = jnp.where((padded | ~usable)[..., None], 0.0, memory)
  return memory, logits
