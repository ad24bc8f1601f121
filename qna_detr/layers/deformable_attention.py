"""Multi-scale deformable attention (Zhu et al., Deformable DETR, 2021).

Every query samples P points per head on each of L value maps of different sizes, at its
reference point plus offsets it predicts, and averages the bilinearly interpolated values with
weights it predicts (a softmax over the L x P points of a head).

The sampling contract (`sample`) is the reference's `ms_deform_attn_core_pytorch`
(fundamentalvision/Deformable-DETR): locations in [0, 1] over each whole (padded) map, x then
y, pixel centres at (i + 0.5) / size (`grid_sample` with `align_corners=False`), zero outside
the map. Locations and interpolation weights are float32 whatever the values' dtype (bfloat16
values are interpolated with float32 weights and summed in float32).

Implementations (`IMPLEMENTATIONS`), one contract: 'gather' (the four corners of every point
gathered from the flattened maps and summed with their weights; its backward scatters into the
maps) and 'dense' (each map contracted with separable interpolation weights by matrix products:
no gather at all, for accelerators with slow gathers and few queries). 'auto' takes 'gather',
the faster of the two at every size measured (`tools/benchmark_deformable.py`). Neither keeps a
copy of the value maps per sampling point: 'gather' holds [queries, points, channels] of
gathered values per head, 'dense' [queries, points, height + width] of weights.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Shapes = tuple[tuple[int, int], ...]

IMPLEMENTATIONS = ('auto', 'gather', 'dense')


def _check(value: Array, shapes: Shapes, locations: Array, weights: Array) -> None:
  batch, length, heads, _ = value.shape
  if sum(h * w for h, w in shapes) != length:
    raise ValueError(f'value has {length} positions, but the level shapes {shapes} hold '
                     f'{sum(h * w for h, w in shapes)}')
  if locations.shape[-1] != 2 or locations.shape[:-1] != weights.shape:
    raise ValueError(f'sampling locations must be [B, Lq, M, L, P, 2] and attention weights '
                     f'[B, Lq, M, L, P]; got {locations.shape} and {weights.shape}')
  if weights.shape[0] != batch or weights.shape[2] != heads or weights.shape[3] != len(shapes):
    raise ValueError(f'attention weights {weights.shape} do not fit value {value.shape} with '
                     f'{len(shapes)} levels')


def _level_starts(shapes: Shapes) -> list[int]:
  return np.concatenate([[0], np.cumsum([h * w for h, w in shapes])[:-1]]).astype(int).tolist()


def _corners(locations: Array, weights: Array, shapes: Shapes) -> tuple[Array, Array]:
  """(index [B, Lq, M, L * P * 4] into the flattened maps, weight [same] float32): the four
  bilinear corners of every point, weighted by its attention weight; corners outside their
  map weigh zero (and point at the map's first cell)."""
  indices, corner_weights = [], []
  for level, ((height, width), start) in enumerate(zip(shapes, _level_starts(shapes))):
    x = locations[..., level, :, 0] * width - 0.5
    y = locations[..., level, :, 1] * height - 0.5
    x0, y0 = jax.lax.stop_gradient(jnp.floor(x)), jax.lax.stop_gradient(jnp.floor(y))
    fx, fy = x - x0, y - y0
    attention = weights[..., level, :]
    for dy, wy in ((0, 1 - fy), (1, fy)):
      for dx, wx in ((0, 1 - fx), (1, fx)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
        flat = jnp.where(inside, yi * width + xi, 0).astype(jnp.int32)
        indices.append(start + flat)
        corner_weights.append(jnp.where(inside, wx * wy * attention, 0.0))
  return jnp.concatenate(indices, -1), jnp.concatenate(corner_weights, -1)


def _gather_rows(per_head: Array, index: Array) -> Array:
  """[B, M, S, D] rows at [B, M, Q, C] indices -> [B, M, Q, C, D]."""
  return jax.vmap(jax.vmap(lambda rows, i: rows[i]))(per_head, index)


def _columns(array: Array, chunk: int, size: int) -> Array:
  """Columns [chunk * i, chunk * (i + 1)) of the last axis."""
  return jax.lax.dynamic_slice_in_dim(array, chunk * size, size, axis=-1)


@jax.custom_vjp
def _weighted_gather(per_head: Array, index: Array, weight: Array) -> Array:
  """sum_k weight[..., k] * per_head[b, m, index[b, m, q, k]]: [B, M, S, D], [B, M, Q, K]
  int32, [B, M, Q, K] float32 -> [B, M, Q, D] float32, four columns (one point's corners) at
  a time, so that no [Q, K, D] tensor is ever held, forward or backward."""
  return _weighted_gather_fwd(per_head, index, weight)[0]


def _weighted_gather_fwd(per_head, index, weight):
  def body(i, total):
    rows = _gather_rows(per_head, _columns(index, i, _CHUNK)).astype(jnp.float32)
    return total + jnp.einsum('bmqc,bmqcd->bmqd', _columns(weight, i, _CHUNK), rows)
  total = jnp.zeros((*index.shape[:3], per_head.shape[-1]), jnp.float32)
  total = jax.lax.fori_loop(0, index.shape[-1] // _CHUNK, body, total)
  return total, (per_head, index, weight)


def _weighted_gather_bwd(residuals, grad):
  per_head, index, weight = residuals
  scatter = jax.vmap(jax.vmap(lambda acc, i, rows: acc.at[i].add(rows)))

  def body(i, carry):
    grad_values, grad_weight = carry
    columns, weights = _columns(index, i, _CHUNK), _columns(weight, i, _CHUNK)
    rows = _gather_rows(per_head, columns).astype(jnp.float32)
    grad_weight = jax.lax.dynamic_update_slice_in_dim(
        grad_weight, jnp.einsum('bmqd,bmqcd->bmqc', grad, rows), _CHUNK * i, axis=-1)
    updates = weights[..., None] * grad[..., None, :]  # [B, M, Q, C, D]
    grad_values = scatter(grad_values, columns.reshape(*columns.shape[:2], -1),
                          updates.reshape(*updates.shape[:2], -1, updates.shape[-1]))
    return grad_values, grad_weight

  init = (jnp.zeros(per_head.shape, jnp.float32), jnp.zeros(weight.shape, jnp.float32))
  grad_values, grad_weight = jax.lax.fori_loop(0, index.shape[-1] // _CHUNK, body, init)
  return grad_values.astype(per_head.dtype), None, grad_weight


_weighted_gather.defvjp(_weighted_gather_fwd, _weighted_gather_bwd)
_CHUNK = 4  # Columns per step: the four corners of one sampling point.


def _sample_gather(value: Array, shapes: Shapes, locations: Array, weights: Array) -> Array:
  indices, corner_weights = _corners(locations, weights, shapes)  # [B, Lq, M, K]
  out = _weighted_gather(jnp.moveaxis(value, 2, 1), jnp.moveaxis(indices, 2, 1),
                         jnp.moveaxis(corner_weights, 2, 1))  # [B, M, Lq, D]
  return jnp.moveaxis(out, 1, 2)


def _tent(coordinate: Array, size: int) -> Array:
  """[..., size] linear interpolation weights of every cell at a pixel coordinate (cell i
  centred at i): max(0, 1 - |coordinate - i|); zero for cells that do not exist."""
  return jax.nn.relu(1.0 - jnp.abs(coordinate[..., None] - jnp.arange(size, dtype=jnp.float32)))


def _sample_dense(value: Array, shapes: Shapes, locations: Array, weights: Array) -> Array:
  matrices = []
  for level, (height, width) in enumerate(shapes):
    wx = _tent(locations[..., level, :, 0] * width - 0.5, width)  # [B, Lq, M, P, W]
    wy = _tent(locations[..., level, :, 1] * height - 0.5, height)  # [B, Lq, M, P, H]
    wy = wy * weights[..., level, :, None]
    matrix = jnp.einsum('bqmph,bqmpw->bqmhw', wy, wx)
    matrices.append(matrix.reshape(*matrix.shape[:3], height * width))
  return jnp.einsum('bqms,bsmd->bqmd', jnp.concatenate(matrices, -1),
                    value.astype(jnp.float32))


_SAMPLERS = {'gather': _sample_gather, 'dense': _sample_dense}


def sample(value: Array, shapes: Sequence[Sequence[int]], locations: Array, weights: Array,
           implementation: str = 'auto') -> Array:
  """Deformable sampling: the attention-weighted bilinear samples of every query and head.

  Args:
    value: [B, S, M, D] the L maps of M heads, each flattened row-major and concatenated
      (S = sum of H_l * W_l).
    shapes: the L maps' (H_l, W_l), static.
    locations: [B, Lq, M, L, P, 2] (x, y) in [0, 1] over each map; outside it samples zero.
    weights: [B, Lq, M, L, P] attention weights.
    implementation: one of IMPLEMENTATIONS.

  Returns:
    [B, Lq, M * D] in value's dtype, heads concatenated.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown deformable attention implementation {implementation!r}; choose '
                     f'from {IMPLEMENTATIONS}.')
  shapes = tuple((int(h), int(w)) for h, w in shapes)
  _check(value, shapes, locations, weights)
  sampler = _SAMPLERS['gather' if implementation == 'auto' else implementation]
  out = sampler(value, shapes, locations.astype(jnp.float32), weights.astype(jnp.float32))
  return out.reshape(*out.shape[:2], -1).astype(value.dtype)


def _offset_bias_init(heads: int, levels: int, points: int):
  """The reference's initial offsets: point p of head m at (p + 1) steps along direction
  2 pi m / M (scaled so that its larger coordinate is 1), on every level."""
  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(heads) * (2.0 * math.pi / heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, levels, points, 1)) * (
        np.arange(1, points + 1)[None, None, :, None])
    return jnp.asarray(grid.reshape(shape), dtype)
  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention: the reference's `MSDeformAttn` module.

  Attributes:
    d_model: query and value width.
    n_levels, n_heads, n_points: L, M and P.
    dtype: compute dtype (sampling locations and interpolation weights stay float32).
    implementation: one of IMPLEMENTATIONS.
  """
  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  dtype: jnp.dtype = jnp.float32
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, query: Array, reference_points: Array, value: Array,
               shapes: Sequence[Sequence[int]], padding_mask: Array | None = None) -> Array:
    """Attends from every query to the L maps.

    Args:
      query: [B, Lq, d_model].
      reference_points: [B, Lq, L, 2] (x, y) in [0, 1], or [B, Lq, L, 4] boxes (cx, cy, w, h):
        points move by offsets / shape of the map, box offsets by offsets / P * (w, h) / 2.
      value: [B, S, d_model] the maps flattened and concatenated, as in `sample`.
      shapes: the maps' (H, W).
      padding_mask: [B, S] True where a position is padding (its value counts as zero).

    Returns:
      [B, Lq, d_model].
    """
    if self.d_model % self.n_heads:
      raise ValueError(f'd_model={self.d_model} must be a multiple of n_heads={self.n_heads}')
    if len(shapes) != self.n_levels:
      raise ValueError(f'{len(shapes)} level shapes for n_levels={self.n_levels}')
    batch, length, _ = query.shape
    heads, levels, points = self.n_heads, self.n_levels, self.n_points
    dense = lambda features, name, **kw: nn.Dense(features, dtype=self.dtype, name=name, **kw)
    values = dense(self.d_model, 'value_proj', kernel_init=nn.initializers.xavier_uniform())(
        value)
    if padding_mask is not None:
      values = jnp.where(padding_mask[..., None], 0, values)
    values = values.reshape(*values.shape[:2], heads, self.d_model // heads)
    offsets = dense(heads * levels * points * 2, 'sampling_offsets',
                    kernel_init=nn.initializers.zeros,
                    bias_init=_offset_bias_init(heads, levels, points))(query)
    offsets = offsets.astype(jnp.float32).reshape(batch, length, heads, levels, points, 2)
    logits = dense(heads * levels * points, 'attention_weights',
                   kernel_init=nn.initializers.zeros)(query)
    attention = jax.nn.softmax(logits.astype(jnp.float32).reshape(
        batch, length, heads, levels * points), -1).reshape(batch, length, heads, levels, points)
    reference = reference_points.astype(jnp.float32)[:, :, None, :, None, :]
    if reference_points.shape[-1] == 2:
      normalizer = jnp.asarray([[w, h] for h, w in shapes], jnp.float32)[:, None, :]
      locations = reference + offsets / normalizer
    elif reference_points.shape[-1] == 4:
      locations = reference[..., :2] + offsets / points * reference[..., 2:] * 0.5
    else:
      raise ValueError(f'reference_points must end in 2 (points) or 4 (boxes), got '
                       f'{reference_points.shape}')
    sampled = sample(values, shapes, locations, attention, self.implementation)
    return dense(self.d_model, 'output_proj', kernel_init=nn.initializers.xavier_uniform())(
        sampled)
