"""The k x k windows of a feature map, as local attention layers and their tools read them.

Window offset (i, j) of output position o is input pixel stride * o + (i, j) - k // 2, with
'same' padding: a [B, H, W, ...] map has Ho x Wo = ceil(H / stride) x ceil(W / stride)
windows. `pad` then `at_offset` give one offset of every window (static offsets, for
unrolled sums); `OffsetViews` does the same for an offset known only at run time (a loop over
offsets, which does not grow the program with k^2); `gather` stacks all offsets and
`scatter_add` is its transpose.
"""
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def output_size(size: int, stride: int) -> int:
  return -(-size // stride)


def pad(x: Array, kernel_size: int, fill: Any = 0) -> Array:
  """[B, H, W, ...] -> [B, H + 2p, W + 2p, ...] with p = k // 2, `fill` outside the map."""
  p = kernel_size // 2
  return jnp.pad(x, ((0, 0), (p, p), (p, p)) + ((0, 0),) * (x.ndim - 3), constant_values=fill)


def at_offset(padded: Array, i: int, j: int, stride: int, ho: int, wo: int,
              axis: int = 1) -> Array:
  """padded[..., i + stride * y, j + stride * x, ...] for every output (y, x) < (ho, wo),
  rows at `axis` and columns next to it."""
  return padded[(slice(None),) * axis + (slice(i, i + stride * (ho - 1) + 1, stride),
                                         slice(j, j + stride * (wo - 1) + 1, stride))]


def gather(x: Array, kernel_size: int, stride: int = 1, fill: Any = 0,
           axis: int | None = None) -> Array:
  """[B, H, W, ...] -> [B, Ho, Wo, k, k, ...]: every window, `fill` outside the map; with
  `axis`, the k * k offsets (row-major) stacked as that one axis of [B, Ho, Wo, ...] instead
  (no transpose afterwards: the stack is built in the layout asked for)."""
  k = kernel_size
  ho, wo = output_size(x.shape[1], stride), output_size(x.shape[2], stride)
  padded = pad(x, k, fill)
  offsets = [at_offset(padded, i, j, stride, ho, wo) for i in range(k) for j in range(k)]
  if axis is not None:
    return jnp.stack(offsets, axis=axis)
  stacked = jnp.stack(offsets, axis=3)
  return stacked.reshape(stacked.shape[:3] + (k, k) + stacked.shape[4:])


def scatter_add(windows: Array, height: int, width: int, stride: int = 1) -> Array:
  """The transpose of `gather`: [B, Ho, Wo, k, k, ...] -> [B, H, W, ...], each input pixel
  receiving the sum of the entries of every window that contains it."""
  k = windows.shape[3]
  s, p = stride, k // 2
  ho, wo = windows.shape[1:3]
  acc = jnp.zeros((windows.shape[0], height + 2 * p, width + 2 * p) + windows.shape[5:],
                  windows.dtype)
  for i in range(k):
    for j in range(k):
      acc = acc.at[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s].add(
          windows[:, :, :, i, j])
  return acc[:, p:p + height, p:p + width]


class OffsetViews:
  """One offset of every window of a padded [B, H + 2p, W + 2p, ...] map, the offset a traced
  integer o = i * k + j; `gather` gives [B, Ho, Wo, ...], `scatter_add` is its transpose."""

  def __init__(self, k: int, stride: int, ho: int, wo: int):
    self.k, self.stride, self.ho, self.wo = k, stride, ho, wo

  def _start(self, offset, ndim):
    return (0, offset // self.k, offset % self.k) + (0,) * (ndim - 3)

  def _extent(self, x):
    return (x.shape[0], self.stride * (self.ho - 1) + 1, self.stride * (self.wo - 1) + 1)

  def gather(self, x: Array, offset) -> Array:
    window = jax.lax.dynamic_slice(x, self._start(offset, x.ndim), self._extent(x) + x.shape[3:])
    return window[:, ::self.stride, ::self.stride]

  def scatter_add(self, acc: Array, contribution: Array, offset) -> Array:
    s = self.stride
    spread = jax.lax.pad(contribution, jnp.zeros((), contribution.dtype),
                         [(0, 0, 0), (0, 0, s - 1), (0, 0, s - 1)]
                         + [(0, 0, 0)] * (contribution.ndim - 3))
    start = self._start(offset, acc.ndim)
    current = jax.lax.dynamic_slice(acc, start, spread.shape)
    return jax.lax.dynamic_update_slice(acc, current + spread, start)
