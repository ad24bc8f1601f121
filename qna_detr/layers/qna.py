"""QnA: shift-invariant local attention with learned queries (Arar et al., CVPR 2022).

Every k x k window attends with the same L learned queries, so the window softmax of
Algorithm 1 (supplement) reduces to element-wise products and k x k window sums:

  out_o = Sum_{n in N(o)} e^(S_n + B_{n-o}) * Ws_{n-o} * V_n / Sum_{n in N(o)} e^(S_n + B_{n-o})

with fused scores S = X (W_K q), so no key tensor is ever built.

Numerics. The authors' release exponentiates the raw scores, which overflows for large inputs.
Here the window sums run as depthwise convolutions on scores shifted by their per-image
maximum (a constant per window, so the ratio is unchanged), and the normalizers are checked:
if any window's normalizer fell into the float range where its terms lose precision (a window
whose scores all sit ~35 nats below the image maximum), the whole call is recomputed with the
exact per-window maximum. That path visits the k^2 window offsets one at a time under
`jax.checkpoint`, so it stays O(HWD) in memory; it is never taken for ordinary activations.
"""
import functools
from typing import Callable, Optional

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


def _depthwise_window_sum(x: Array, kernel: Array, stride: int, pad: int) -> Array:
  """Sum_k: weighted k x k window sums of each channel, float32 accumulation.

  x: [B, H, W, C]; kernel: [k, k, C] (one k x k weight per channel).
  """
  k = kernel.shape[0]
  return jax.lax.conv_general_dilated(
      x, kernel.reshape(k, k, 1, -1).astype(x.dtype),
      window_strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1],
      preferred_element_type=jnp.float32)


def _aggregate_fast(scores, values, valid, bias, scale, stride):
  """Window softmax as two depthwise convolutions (Algorithm 1), shifted per image.

  Returns the output [B, Ho, Wo, Q, h, d] and whether every window's normalizer is safe.
  """
  k = bias.shape[0]
  pad = (k - 1) // 2
  b, hgt, wid, nq, nh = scores.shape
  hd = values.shape[-1]
  # Shift by the per-(image, query, head) maximum over valid pixels: constant in every window.
  masked = jnp.where(valid[..., None, None], scores, _MASKED_SCORE)
  shift = jax.lax.stop_gradient(jnp.max(masked, axis=(1, 2), keepdims=True))
  weights = jnp.where(valid[..., None, None], jnp.exp(masked - shift), 0.0)  # [B,H,W,Q,h] f32
  # exp(B) shifted by its maximum per (query, head): again constant in every window.
  bias_exp = jnp.exp(bias - jax.lax.stop_gradient(jnp.max(bias, axis=(0, 1))))  # [k,k,Q,h]

  weighted_values = weights[..., None].astype(values.dtype) * values[:, :, :, None]
  num_kernel = jnp.broadcast_to((bias_exp * scale)[..., None], (k, k, nq, nh, hd))
  num = _depthwise_window_sum(weighted_values.reshape(b, hgt, wid, -1),
                              num_kernel.reshape(k, k, -1), stride, pad)
  den = _depthwise_window_sum(weights.reshape(b, hgt, wid, -1),
                              bias_exp.reshape(k, k, -1), stride, pad)
  ho, wo = num.shape[1:3]
  num = num.reshape(b, ho, wo, nq, nh, hd)
  den = den.reshape(b, ho, wo, nq, nh)

  window_has_valid = masking.window_any(valid, k, stride)  # [B,Ho,Wo]
  safe = jnp.all((den >= _MIN_SAFE_NORMALIZER) | ~window_has_valid[..., None, None])
  return _safe_divide(num, den), safe


def _safe_divide(num: Array, den: Array) -> Array:
  """num / den, and 0 where den is too small to trust.

  That covers windows without a valid pixel (den = 0) and keeps the gradient of a discarded
  fast path finite: 1 / den^2 of a subnormal den would overflow, and inf * 0 is NaN.
  """
  trusted = den >= _MIN_SAFE_NORMALIZER
  den = jnp.where(trusted, den, 1.0)
  return jnp.where(trusted[..., None], num / den[..., None], 0.0)


@functools.partial(jax.checkpoint, static_argnums=(5,))
def _aggregate_exact(scores, values, valid, bias, scale, stride):
  """Window softmax with the exact per-window maximum, one window offset at a time.

  A loop (not an unrolled k^2 sequence) keeps the compiled program small; the checkpoint keeps
  the backward pass from storing per-offset intermediates.
  """
  k = bias.shape[0]
  pad = (k - 1) // 2
  b, hgt, wid = scores.shape[:3]
  ho, wo = -(-hgt // stride), -(-wid // stride)
  spatial_pad = ((0, 0), (pad, pad), (pad, pad))

  masked = jnp.where(valid[..., None, None], scores, _MASKED_SCORE)
  masked = jnp.pad(masked, spatial_pad + ((0, 0), (0, 0)), constant_values=_MASKED_SCORE)
  values = jnp.pad(values, spatial_pad + ((0, 0), (0, 0)))
  valid = jnp.pad(valid, spatial_pad)

  def at_offset(x, offset):
    """The input pixel at window offset `offset` of every output window: [B, Ho, Wo, ...]."""
    i, j = offset // k, offset % k
    window = (b, stride * (ho - 1) + 1, stride * (wo - 1) + 1) + x.shape[3:]
    start = (0, i, j) + (0,) * (x.ndim - 3)
    return jax.lax.dynamic_slice(x, start, window)[:, ::stride, ::stride]

  def logits_at(offset):
    return at_offset(masked, offset) + bias.reshape(k * k, *bias.shape[2:])[offset]

  window_max = jax.lax.fori_loop(
      0, k * k, lambda o, m: jnp.maximum(m, logits_at(o)),
      jnp.full((b, ho, wo) + scores.shape[3:], _MASKED_SCORE, jnp.float32))
  window_max = jax.lax.stop_gradient(window_max)

  def accumulate(offset, carry):
    num, den = carry
    present = at_offset(valid, offset)[..., None, None]
    e = jnp.where(present, jnp.exp(logits_at(offset) - window_max), 0.0)
    weight = e * scale.reshape(k * k, *scale.shape[2:])[offset]
    return (num + weight[..., None] * at_offset(values, offset)[:, :, :, None], den + e)

  num = jnp.zeros(window_max.shape + values.shape[-1:], jnp.float32)
  num, den = jax.lax.fori_loop(0, k * k, accumulate, (num, jnp.zeros_like(window_max)))
  return _safe_divide(num, den)


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
  """
  fast, safe = _aggregate_fast(scores, values, valid, bias, scale, stride)
  return jax.lax.cond(safe, lambda *_: fast, lambda *args: _aggregate_exact(*args, stride),
                      scores, values, valid, bias, scale)


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

    query = self.param('query', _query_init(hd), (nq, self.features)).reshape(nq, nh, hd)
    if self.normalize_queries:
      query = query / (jnp.linalg.norm(query, axis=-1, keepdims=True) + 1e-6)
    query = query / np.sqrt(hd)
    w_k = self.param('Wk', self.kernel_init, (x.shape[-1], self.features)).reshape(-1, nh, hd)
    bias = self.param('rpe_bias', nn.initializers.zeros, (k, k, nq, nh))
    scale = self.param('attn_scale_weights', nn.initializers.normal(0.02), (k, k, nq, nh))

    x = x.astype(self.dtype)
    # Fused scores: (W_K q) first, so the [B, H, W, D] key tensor never exists.
    query_keys = jnp.einsum('qhd,chd->cqh', query, w_k).astype(self.dtype)
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
