"""QnA: shift-invariant local attention with learned queries (Arar et al., CVPR 2022).

Every k x k window attends with the same L learned queries, so the window softmax of
Algorithm 1 (supplement) reduces to element-wise products and k x k window sums:

  out_o = Sum_{n in N(o)} e^(S_n + B_{n-o}) * Ws_{n-o} * V_n / Sum_{n in N(o)} e^(S_n + B_{n-o})

with fused scores S = X (W_K q), so no key tensor is ever built.

Numerics. The authors' release exponentiates the raw scores, which overflows for large inputs.
Here the window sums run on scores shifted by their per-image maximum (a constant per window,
so the ratio is unchanged), and the normalizers are checked: if any window's normalizer fell
into the float range where its terms lose precision (a window whose scores all sit ~35 nats
below the image maximum), the whole call is recomputed with the exact per-window maximum,
visiting the k^2 window offsets one at a time; it is never taken for ordinary activations.
Both paths have a hand-written backward pass (custom VJP) that, like the forward, needs
O(HWD) memory whatever k is.
"""
import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qna_detr.layers import masking

Array = jax.Array
Dtype = jnp.dtype

# Normalizers below this (about e^-34.5) mean the shifted exponentials may have lost precision.
# Its square must stay a normal float32: the division's gradient divides by den^2.
_MIN_SAFE_NORMALIZER = 1e-15
# Stands in for -inf on padded scores: exp() of it is exactly 0 and its gradient is finite.
_MASKED_SCORE = -1e30


def _query_init(head_dim: int) -> Callable:
  """Truncated normal with std sqrt(1 / d_h), as in the authors' release."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * np.sqrt(1.0 / head_dim)
  return init


def _shifted(x: Array, i: int, j: int, stride: int, ho: int, wo: int) -> Array:
  """x[:, i + stride * y, j + stride * x] for every output (y, x) < (ho, wo)."""
  return x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]


def _output_size(size: int, stride: int) -> int:
  return -(-size // stride)


def _window_sum(x: Array, kernel: Array, stride: int) -> Array:
  """Sum_k: out[o] = sum over offsets (i, j) of kernel[i, j] * x[stride * o + (i, j) - k // 2].

  x: [B, H, W, ...]; kernel: [k, k, ...] broadcasting against x's trailing dims; zero
  ('same') padding; float32 accumulation. Written as k^2 shifted slices that XLA fuses into
  one pass: on CPUs several times faster than a depthwise convolution, whose gradient with
  respect to the kernel is slower still.
  """
  k = kernel.shape[0]
  p = k // 2
  ho, wo = _output_size(x.shape[1], stride), _output_size(x.shape[2], stride)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p)) + ((0, 0),) * (x.ndim - 3))
  kernel = kernel.astype(jnp.float32)
  terms = (kernel[i, j] * _shifted(xp, i, j, stride, ho, wo).astype(jnp.float32)
           for i in range(k) for j in range(k))
  return functools.reduce(jnp.add, terms)


def _window_sum_transpose(g: Array, kernel: Array, stride: int, height: int,
                          width: int) -> Array:
  """The input cotangent of `_window_sum`, gathered (not scattered) so that it fuses too."""
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
  terms = (kernel[i, j] * _shifted(gd, k - 1 - i, k - 1 - j, 1, height, width)
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

  def shifted(a, axis, i, j):  # a[..., i + stride * y, j + stride * x, ...], rows at axis.
    return a[(slice(None),) * axis + (slice(i, i + stride * (rows - 1) + 1, stride),
                                      slice(j, j + stride * (wo - 1) + 1, stride))]

  g = jnp.pad(g, [(0, 0)] * g_axis + [(0, chunks * rows - ho)] + [(0, 0)] * (g.ndim - g_axis - 1))
  padded = [(pad(a, axis), axis) for a, axis in inputs]

  def accumulate(chunk, sums):
    g_rows = jax.lax.dynamic_slice_in_dim(g, chunk * rows, rows, g_axis)
    in_chunk = [(jax.lax.dynamic_slice_in_dim(a, chunk * rows * stride, span, axis), axis)
                for a, axis in padded]
    return sums + jnp.stack([term(g_rows, *(shifted(a, axis, i, j) for a, axis in in_chunk))
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


def _fast_weights(scores: Array, valid: Array, bias: Array) -> tuple[Array, Array]:
  """exp(S) and exp(B), each shifted by a maximum that is constant inside every window.

  S is shifted per (image, query, head) over valid pixels, B per (query, head); padded pixels
  get weight 0.
  """
  masked = jnp.where(valid[..., None, None], scores, _MASKED_SCORE)
  shift = jax.lax.stop_gradient(jnp.max(masked, axis=(1, 2), keepdims=True))
  weights = jnp.where(valid[..., None, None], jnp.exp(masked - shift), 0.0)  # [B,H,W,Q,h]
  bias_exp = jnp.exp(bias - jax.lax.stop_gradient(jnp.max(bias, axis=(0, 1))))  # [k,k,Q,h]
  return weights, bias_exp


def _inverse(den: Array) -> Array:
  """1 / den, and 0 where den is too small to trust (a window without a valid pixel, or an
  underflowed fast-path normalizer)."""
  trusted = den >= _MIN_SAFE_NORMALIZER
  return jnp.where(trusted, 1.0 / jnp.where(trusted, den, 1.0), 0.0)


def _aggregate_fast(scores, values, valid, bias, scale, stride):
  """Window softmax as two window sums (Algorithm 1).

  Returns the output [B, Ho, Wo, Q, h, d] and whether every window's normalizer is safe.
  """
  weights, bias_exp = _fast_weights(scores, valid, bias)
  weighted_values = weights[..., None].astype(values.dtype) * values[:, :, :, None]
  num = _window_sum(weighted_values, (bias_exp * scale)[..., None], stride)
  den = _window_sum(weights, bias_exp, stride)
  window_has_valid = masking.window_any(valid, bias.shape[0], stride)  # [B, Ho, Wo]
  safe = jnp.all((den >= _MIN_SAFE_NORMALIZER) | ~window_has_valid[..., None, None])
  return num * _inverse(den)[..., None], safe


def _fast_input_grads(weights, bias_exp, inv, values, scale, stride, g_out, g):
  """The fast path's cotangents of the scores and values (for the queries given), by the
  transposes of its two window sums."""
  hgt, wid = weights.shape[1:3]
  d_weighted = _window_sum_transpose(g * inv[..., None], (bias_exp * scale)[..., None], stride,
                                     hgt, wid)
  d_weights = ((d_weighted * values[:, :, :, None]).sum(-1)
               + _window_sum_transpose(-g_out * inv, bias_exp, stride, hgt, wid))
  d_values = (d_weighted * weights[..., None]).sum(3)
  return d_weights * weights, d_values.astype(jnp.float32)


def _fast_grads(scores, values, valid, bias, scale, stride, g_out, g):
  """Cotangents of the fast path.

  The weights and normalizers are recomputed once for all queries (maps of Q * h channels).
  The input cotangents go one query at a time: queries are independent but for their sum
  into dV, so only one query's [B, H, W, h, d] temporaries are held at a time. The kernel
  cotangents (reductions over every pixel and offset, the costliest part) go for all queries
  at once, so the values are read once for all of them.
  """
  weights, bias_exp = _fast_weights(scores, valid, bias)
  inv = _inverse(_window_sum(weights, bias_exp, stride))

  def one(q, carry):
    d_scores, d_values = carry
    ds, dv = _fast_input_grads(_take(weights, 3, q), _take(bias_exp, 2, q), _take(inv, 3, q),
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


class _Offsets:
  """Views of padded [B, H + 2p, W + 2p, ...] maps at one window offset of every output.

  Offset o = i * k + j is the pixel (i - p, j - p) away from a window's centre; `gather` gives
  [B, Ho, Wo, ...], `scatter_add` is its transpose.
  """

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


def _exact_setup(scores, values, valid, bias, stride):
  """Padded inputs, the offset views, and a function giving exp(logit - window max) at an
  offset (0 where the pixel is padding or outside the image)."""
  k = bias.shape[0]
  pad = (k - 1) // 2
  hgt, wid = scores.shape[1:3]
  views = _Offsets(k, stride, -(-hgt // stride), -(-wid // stride))
  spatial = ((0, 0), (pad, pad), (pad, pad))
  masked = jnp.pad(jnp.where(valid[..., None, None], scores, _MASKED_SCORE),
                   spatial + ((0, 0), (0, 0)), constant_values=_MASKED_SCORE)
  values = jnp.pad(values, spatial + ((0, 0), (0, 0)))
  valid = jnp.pad(valid, spatial)
  flat_bias = bias.reshape(k * k, *bias.shape[2:])

  def logits(offset):
    return views.gather(masked, offset) + flat_bias[offset]

  first = logits(0)
  window_max = jax.lax.fori_loop(1, k * k, lambda o, m: jnp.maximum(m, logits(o)), first)

  def weight(offset):
    present = views.gather(valid, offset)[..., None, None]
    return jnp.where(present, jnp.exp(logits(offset) - window_max), 0.0)

  return views, values, weight


def _aggregate_exact(scores, values, valid, bias, scale, stride):
  """Window softmax with the exact per-window maximum, one window offset at a time (a loop,
  so the compiled program does not grow with k^2)."""
  k = bias.shape[0]
  views, padded_values, weight = _exact_setup(scores, values, valid, bias, stride)
  flat_scale = scale.reshape(k * k, *scale.shape[2:])

  def accumulate(offset, carry):
    num, den = carry
    e = weight(offset)
    contribution = (e * flat_scale[offset])[..., None] * views.gather(padded_values, offset)[
        :, :, :, None]
    return num + contribution, den + e

  shape = (scores.shape[0], views.ho, views.wo) + scores.shape[3:]
  num, den = jax.lax.fori_loop(0, k * k, accumulate,
                               (jnp.zeros(shape + values.shape[-1:], jnp.float32),
                                jnp.zeros(shape, jnp.float32)))
  return num * _inverse(den)[..., None]


def _exact_grads(scores, values, valid, bias, scale, stride, g_out, g):
  """Cotangents of the exact path from normalized attention a, one offset at a time:
  dl = a (Ws (g . V) - g . out) for every logit l = S + B, dWs = a (g . V), dV = a Ws g."""
  k = bias.shape[0]
  pad = (k - 1) // 2
  views, padded_values, weight = _exact_setup(scores, values, valid, bias, stride)
  inv = _inverse(jax.lax.fori_loop(0, k * k, lambda o, d: d + weight(o),
                                   jnp.zeros(g_out.shape, jnp.float32)))
  flat_scale = scale.reshape(k * k, *scale.shape[2:])

  def accumulate(offset, carry):
    d_scores, d_values, d_bias, d_scale = carry
    attention = weight(offset) * inv
    g_values = (g * views.gather(padded_values, offset)[:, :, :, None]).sum(-1)
    d_logits = attention * (flat_scale[offset] * g_values - g_out)
    d_scores = views.scatter_add(d_scores, d_logits, offset)
    d_values = views.scatter_add(
        d_values, ((attention * flat_scale[offset])[..., None] * g).sum(3), offset)
    return (d_scores, d_values, d_bias.at[offset].set(d_logits.sum((0, 1, 2))),
            d_scale.at[offset].set((attention * g_values).sum((0, 1, 2))))

  zeros = jnp.zeros((k * k,) + bias.shape[2:], jnp.float32)
  init = (jnp.zeros(scores.shape[:1] + padded_values.shape[1:3] + scores.shape[3:], jnp.float32),
          jnp.zeros(padded_values.shape, jnp.float32), zeros, zeros)
  d_scores, d_values, d_bias, d_scale = jax.lax.fori_loop(0, k * k, accumulate, init)
  crop = (slice(None), slice(pad, pad + scores.shape[1]), slice(pad, pad + scores.shape[2]))
  return (d_scores[crop], d_values[crop].astype(values.dtype), d_bias.reshape(bias.shape),
          d_scale.reshape(scale.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def window_softmax_aggregate(scores: Array, values: Array, valid: Array, bias: Array,
                             scale: Array, stride: int) -> Array:
  """The QnA window softmax of every query and head.

  Args:
    scores: [B, H, W, Q, h] query-key scores (float32).
    values: [B, H, W, h, d] values (compute dtype).
    valid: [B, H, W] bool, False for padded pixels, which join no window.
    bias: [k, k, Q, h] relative position bias added to the scores inside the softmax.
    scale: [k, k, Q, h] attention scale weights applied to the numerator only.
    stride: output stride; windows are centred on every stride-th pixel ('same' padding).

  Returns:
    [B, ceil(H/stride), ceil(W/stride), Q, h, d] float32; zeros for windows without a valid
    pixel.

  The gradient is written out (custom VJP) so that neither path stores per-offset or
  per-window intermediates: the backward pass needs O(HWD) memory like the forward.
  """
  return _aggregate(scores, values, valid, bias, scale, stride)[0]


def _aggregate(scores, values, valid, bias, scale, stride):
  fast, safe = _aggregate_fast(scores, values, valid, bias, scale, stride)
  out = jax.lax.cond(safe, lambda *_: fast,
                     lambda *args: _aggregate_exact(*args, stride),
                     scores, values, valid, bias, scale)
  return out, safe


def _aggregate_fwd(scores, values, valid, bias, scale, stride):
  out, safe = _aggregate(scores, values, valid, bias, scale, stride)
  return out, (scores, values, valid, bias, scale, out, safe)


def _aggregate_bwd(stride, residuals, g):
  scores, values, valid, bias, scale, out, safe = residuals
  g = g.astype(jnp.float32)
  g_out = (g * out).sum(-1)  # All either path needs of the output.
  grads = jax.lax.cond(
      safe, lambda *args: _fast_grads(*args[:5], stride, *args[5:]),
      lambda *args: _exact_grads(*args[:5], stride, *args[5:]),
      scores, values, valid, bias, scale, g_out, g)
  d_scores, d_values, d_bias, d_scale = grads
  return d_scores, d_values, None, d_bias, d_scale


window_softmax_aggregate.defvjp(_aggregate_fwd, _aggregate_bwd)


def _check_config(features: int, heads: int, kernel_size: int, stride: int,
                  num_queries: int, upsample: int) -> None:
  if heads < 1 or features < 1 or features % heads:
    raise ValueError(f'features ({features}) must be a positive multiple of heads ({heads}).')
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f'kernel_size must be a positive odd integer, got {kernel_size}.')
  if stride < 1:
    raise ValueError(f'stride must be >= 1, got {stride}.')
  if num_queries < 1:
    raise ValueError(f'num_queries must be >= 1, got {num_queries}.')
  if upsample < 1 or (upsample > 1 and stride != 1):
    raise ValueError(f'upsample must be >= 1 and needs stride 1, got upsample={upsample}, '
                     f'stride={stride}.')


def fused_query_keys(query: Array, w_k: Array, heads: int, normalize_queries: bool) -> Array:
  """W_K q for every query and head: [C, Q, h], so that the scores are S = X (W_K q).

  query: the [Q, D] parameter, unit-normalized per head (if asked) and scaled by 1/sqrt(d_h)
  here; w_k: the [C, D] key projection. Public so that tools can recompute the layer's scores.
  """
  head_dim = query.shape[-1] // heads
  query = query.reshape(query.shape[0], heads, head_dim)
  if normalize_queries:
    query = query / (jnp.linalg.norm(query, axis=-1, keepdims=True) + 1e-6)
  query = query / np.sqrt(head_dim)
  return jnp.einsum('qhd,chd->cqh', query, w_k.reshape(-1, heads, head_dim))


class QnA(nn.Module):
  """Query-and-Attend layer.

  Attributes:
    features: output channels D (heads * head dim); also the width of values and keys.
    heads: attention heads h.
    kernel_size: odd window size k.
    stride: 1, or 2 to downsample H x W to ceil(H/2) x ceil(W/2).
    num_queries: learned queries L; their outputs are summed.
    upsample: s > 1 upsamples by s with s^2 query groups and a depth-to-space reshape
      (supplement, section 6); with num_queries=1 this is exactly the paper's variant.
    normalize_queries: unit-normalize each query per head (the released models do).
    dtype: compute dtype; parameters stay float32 and the softmax accumulates in float32.
  """
  features: int
  heads: int
  kernel_size: int = 3
  stride: int = 1
  num_queries: int = 2
  upsample: int = 1
  normalize_queries: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None) -> Array:
    """x: [B, H, W, C]; padding_mask: [B, H, W] bool, True = padded pixel (excluded)."""
    _check_config(self.features, self.heads, self.kernel_size, self.stride, self.num_queries,
                  self.upsample)
    if x.ndim != 4:
      raise ValueError(f'x must have rank 4 [B, H, W, C], got shape {x.shape}.')
    valid = masking.valid_from_padding(padding_mask, x.shape)
    k, nh, up = self.kernel_size, self.heads, self.upsample
    hd = self.features // nh
    nq = self.num_queries * up * up

    query = self.param('query', _query_init(hd), (nq, self.features))
    w_k = self.param('Wk', self.kernel_init, (x.shape[-1], self.features))
    bias = self.param('rpe_bias', nn.initializers.zeros, (k, k, nq, nh))
    scale = self.param('attn_scale_weights', nn.initializers.normal(0.02), (k, k, nq, nh))

    x = x.astype(self.dtype)
    # Fused scores: (W_K q) first, so the [B, H, W, D] key tensor never exists.
    query_keys = fused_query_keys(query, w_k, nh, self.normalize_queries).astype(self.dtype)
    scores = jnp.einsum('bywc,cqh->bywqh', x, query_keys, preferred_element_type=jnp.float32)
    values = nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                      kernel_init=self.kernel_init, name='to_v')(x)
    values = values.reshape(*values.shape[:3], nh, hd)

    out = window_softmax_aggregate(scores, values, valid, bias, scale, self.stride)
    b, ho, wo = out.shape[:3]
    out = out.reshape(b, ho, wo, up, up, self.num_queries, self.features).sum(axis=5)
    out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, ho * up, wo * up, self.features)
    return nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                    kernel_init=self.kernel_init, name='to_out')(out.astype(self.dtype))
