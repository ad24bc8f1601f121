"""QnA's window sums as k x k shifted slices, with a hand-written backward: the CPU path.

XLA fuses the k^2 slices of a window sum into one pass, on CPUs several times faster than a
depthwise convolution, whose gradient with respect to the kernel is slower still. The backward
pass needs O(HWD) memory like the forward: the input cotangents go one query at a time and the
kernel cotangents in a loop over chunks of output rows, so no per-offset or per-window
intermediate is ever stored.
"""
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from qna_detr.layers import qna_softmax
from qna_detr.layers import windows

Array = jax.Array


def window_sum(x: Array, kernel: Array, stride: int) -> Array:
  """Sum_k: out[o] = sum over offsets (i, j) of kernel[i, j] * x[stride * o + (i, j) - k // 2].

  x: [B, H, W, ...]; kernel: [k, k, ...] broadcasting against x's trailing dims; zero
  ('same') padding; float32 accumulation.
  """
  k = kernel.shape[0]
  ho, wo = windows.output_size(x.shape[1], stride), windows.output_size(x.shape[2], stride)
  xp = windows.pad(x, k)
  kernel = kernel.astype(jnp.float32)
  terms = (kernel[i, j] * windows.at_offset(xp, i, j, stride, ho, wo).astype(jnp.float32)
           for i in range(k) for j in range(k))
  return functools.reduce(jnp.add, terms)


def _window_sum_transpose(g: Array, kernel: Array, stride: int, height: int,
                          width: int) -> Array:
  """The input cotangent of `window_sum`, gathered (not scattered) so that it fuses too."""
  k = kernel.shape[0]
  p = k // 2
  ho, wo = g.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  rest = [(0, 0, 0)] * (g.ndim - 3)
  # gd[p + stride * o] = g[o]: the cotangent spread on the input grid, zeros elsewhere.
  gd = jax.lax.pad(g, zero, [(0, 0, 0),
                             (p, height + k - 2 - p - stride * (ho - 1), stride - 1),
                             (p, width + k - 2 - p - stride * (wo - 1), stride - 1)] + rest)
  kernel = kernel.astype(jnp.float32)
  terms = (kernel[i, j] * windows.at_offset(gd, k - 1 - i, k - 1 - j, 1, height, width)
           for i in range(k) for j in range(k))
  return functools.reduce(jnp.add, terms)


_KERNEL_GRAD_ROWS = 2  # Output rows per fused pass of `_offset_sums`.


def _offset_sums(g: Array, g_axis: int, inputs: Sequence[tuple[Array, int]], k: int,
                 stride: int, term: Callable[..., Array], shape: tuple[int, ...]) -> Array:
  """[k, k, *shape]: per offset (i, j), term(g, *inputs shifted by (i, j)) summed over chunks.

  g has its output rows at g_axis and columns next to it; each input has its rows at the axis
  given with it and columns next, and is 'same'-padded here. A loop over chunks of output rows,
  each one fused pass over all k^2 offsets: one pass per offset would read the inputs k^2
  times, and one pass over everything would hold all k^2 products (GBs at k = 7).
  """
  p = k // 2
  ho, wo = g.shape[g_axis:g_axis + 2]
  rows = _KERNEL_GRAD_ROWS
  chunks = -(-ho // rows)
  span = stride * (rows - 1) + k
  in_rows = stride * (chunks * rows - 1) + k  # Padded input rows that the chunks reach.

  def pad(a, axis):
    widths = [(0, 0)] * a.ndim
    widths[axis], widths[axis + 1] = (p, in_rows - a.shape[axis] - p), (p, p)
    return jnp.pad(a, widths)

  g = jnp.pad(g, [(0, 0)] * g_axis + [(0, chunks * rows - ho)] + [(0, 0)] * (g.ndim - g_axis - 1))
  padded = [(pad(a, axis), axis) for a, axis in inputs]

  def accumulate(chunk, sums):
    g_rows = jax.lax.dynamic_slice_in_dim(g, chunk * rows, rows, g_axis)
    in_chunk = [(jax.lax.dynamic_slice_in_dim(a, chunk * rows * stride, span, axis), axis)
                for a, axis in padded]
    return sums + jnp.stack([
        term(g_rows, *(windows.at_offset(a, i, j, stride, rows, wo, axis) for a, axis in in_chunk))
        for i in range(k) for j in range(k)])

  sums = jax.lax.fori_loop(0, chunks, accumulate, jnp.zeros((k * k,) + shape, jnp.float32))
  return sums.reshape((k, k) + shape)


def _window_kernel_grad(g: Array, weights: Array, values: Array, k: int,
                        stride: int) -> Array:
  """The kernel cotangent [k, k, Q, h] of a window sum of weights * values: per offset (i, j),
  the sum over images, outputs and channels of g times the weights * values at that offset.

  g: [B, Ho, Wo, Q, h, d] output cotangent; weights: [B, H, W, Q, h]; values: [B, H, W, h, d].
  The reduction keeps (Q, h) and sums everything else, so the operands are first laid out as
  [Q, h, B, H, W, d]: every reduction then runs over contiguous trailing dims, which XLA's
  CPU backend vectorizes (summing over leading and trailing dims at once is several times
  slower).
  """
  def term(g_rows, w, v):
    return (g_rows * (w[..., None] * v[None].astype(jnp.float32))).sum((2, 3, 4, 5))

  return _offset_sums(jnp.moveaxis(g, (3, 4), (0, 1)), 3,
                      [(jnp.moveaxis(weights, (3, 4), (0, 1)), 3),
                       (jnp.moveaxis(values, 3, 0), 2)], k, stride, term, g.shape[3:5])


def _den_kernel_grad(g_den: Array, weights: Array, k: int, stride: int) -> Array:
  """The kernel cotangent [k, k, Q, h] of the denominator's window sum of the weights (maps of
  Q * h channels only: no layout change needed)."""
  return _offset_sums(g_den, 1, [(weights, 1)], k, stride,
                      lambda g_rows, w: (g_rows * w).sum((0, 1, 2)), g_den.shape[3:])


def _take(x: Array, axis: int, q) -> Array:
  """Query q of x along `axis`, keeping the axis (size 1)."""
  return jax.lax.dynamic_slice_in_dim(x, q, 1, axis)


def _put(x: Array, update: Array, axis: int, q) -> Array:
  return jax.lax.dynamic_update_slice_in_dim(x, update.astype(x.dtype), q, axis)


def _input_grads(weights, bias_exp, inv, values, scale, stride, g_out, g):
  """The cotangents of the scores and values (for the queries given), by the transposes of
  the two window sums."""
  hgt, wid = weights.shape[1:3]
  d_weighted = _window_sum_transpose(g * inv[..., None], (bias_exp * scale)[..., None], stride,
                                     hgt, wid)
  d_weights = ((d_weighted * values[:, :, :, None]).sum(-1)
               + _window_sum_transpose(-g_out * inv, bias_exp, stride, hgt, wid))
  d_values = (d_weighted * weights[..., None]).sum(3)
  return d_weights * weights, d_values.astype(jnp.float32)


def _forward(scores, values, valid, bias, scale, stride):
  return qna_softmax.fast_aggregate(window_sum, scores, values, valid, bias, scale, stride)


def _backward(scores, values, valid, bias, scale, stride, g_out, g):
  """Cotangents of the fast path.

  The weights and normalizers are recomputed once for all queries (maps of Q * h channels).
  The input cotangents go one query at a time: queries are independent but for their sum
  into dV, so only one query's [B, H, W, h, d] temporaries are held at a time. The kernel
  cotangents (reductions over every pixel and offset, the costliest part) go for all queries
  at once, so the values are read once for all of them.
  """
  weights, bias_exp = qna_softmax.fast_weights(scores, valid, bias)
  inv = qna_softmax.inverse(window_sum(weights, bias_exp, stride))

  def one(q, carry):
    d_scores, d_values = carry
    ds, dv = _input_grads(_take(weights, 3, q), _take(bias_exp, 2, q), _take(inv, 3, q),
                          values, _take(scale, 2, q), stride, _take(g_out, 3, q),
                          _take(g, 3, q))
    return _put(d_scores, ds, 3, q), d_values + dv

  init = (jnp.zeros(scores.shape, jnp.float32), jnp.zeros(values.shape, jnp.float32))
  d_scores, d_values = jax.lax.fori_loop(0, scores.shape[3], one, init)
  k = bias.shape[0]
  # d loss / d numerator is g * inv[..., None]; d loss / d denominator is -g_out * inv.
  d_num_kernel = _window_kernel_grad(g * inv[..., None], weights, values, k, stride)
  d_den_kernel = _den_kernel_grad(-g_out * inv, weights, k, stride)
  return (d_scores, d_values.astype(values.dtype),
          (d_num_kernel * scale + d_den_kernel) * bias_exp, d_num_kernel * bias_exp)


aggregate = qna_softmax.with_exact_fallback(
    qna_softmax.FastPath(_forward, _backward, branch_backward=True))
