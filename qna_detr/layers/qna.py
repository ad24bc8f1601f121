"""QnA: shift-invariant local attention with learned queries (Arar et al., CVPR 2022).

Every k x k window attends with the same L learned queries, so the window softmax of
Algorithm 1 (supplement) reduces to element-wise products and k x k window sums:

  out_o = Sum_{n in N(o)} e^(S_n + B_{n-o}) * Ws_{n-o} * V_n / Sum_{n in N(o)} e^(S_n + B_{n-o})

with fused scores S = X (W_K q), so no key tensor is ever built.

Implementations (`IMPLEMENTATIONS`), one numerical contract (`qna_softmax`): 'slices'
(`qna_slices`, k^2 shifted slices that XLA fuses, a hand-written backward; fast on CPUs) and
'conv' (`qna_conv`, depthwise convolutions differentiated by autodiff; a compiled program that
does not grow with k^2, for GPUs and TPUs). 'auto' picks 'slices' when lowered for a CPU and
'conv' for any other platform. All shift the exponentials by a maximum constant inside every
window and fall back to the exact per-window maximum when a normalizer underflows, so large
inputs stay finite and exact; all need O(HWD) memory whatever k is.
"""
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qna_detr.layers import masking, qna_conv, qna_slices

Array = jax.Array
Dtype = jnp.dtype

IMPLEMENTATIONS = ('auto', 'slices', 'conv')
_AGGREGATES = {'slices': qna_slices.aggregate, 'conv': qna_conv.aggregate}


def _query_init(head_dim: int) -> Callable:
  """Truncated normal with std sqrt(1 / d_h), as in the authors' release."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * np.sqrt(1.0 / head_dim)
  return init


def _check_implementation(implementation: str) -> None:
  """Raises a ValueError naming `implementation` unless it is one of IMPLEMENTATIONS."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown QnA implementation {implementation!r}; choose from '
                     f'{IMPLEMENTATIONS}.')


def window_softmax_aggregate(scores: Array, values: Array, valid: Array, bias: Array,
                             scale: Array, stride: int, implementation: str = 'auto') -> Array:
  """The QnA window softmax of every query and head.

  Args:
    scores: [B, H, W, Q, h] query-key scores (float32).
    values: [B, H, W, h, d] values (compute dtype).
    valid: [B, H, W] bool, False for padded pixels, which join no window.
    bias: [k, k, Q, h] relative position bias added to the scores inside the softmax.
    scale: [k, k, Q, h] attention scale weights applied to the numerator only.
    stride: output stride; windows are centred on every stride-th pixel ('same' padding).
    implementation: one of IMPLEMENTATIONS.

  Returns:
    [B, ceil(H/stride), ceil(W/stride), Q, h, d] float32; zeros for windows without a valid
    pixel.
  """
  _check_implementation(implementation)
  args = (scores, values, valid, bias, scale)
  if implementation != 'auto':
    return _AGGREGATES[implementation](*args, stride)
  # Both are traced; the lowering keeps only the lowering platform's branch.
  return jax.lax.platform_dependent(
      *args, cpu=lambda *a: qna_slices.aggregate(*a, stride),
      default=lambda *a: qna_conv.aggregate(*a, stride))


def _check_config(features: int, heads: int, kernel_size: int, stride: int,
                  num_queries: int, upsample: int, implementation: str) -> None:
  _check_implementation(implementation)
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
    implementation: how the window softmax runs, one of IMPLEMENTATIONS; every one gives the
      same results up to rounding, and 'auto' picks the lowering platform's.
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
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None) -> Array:
    """x: [B, H, W, C]; padding_mask: [B, H, W] bool, True = padded pixel (excluded)."""
    _check_config(self.features, self.heads, self.kernel_size, self.stride, self.num_queries,
                  self.upsample, self.implementation)
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

    out = window_softmax_aggregate(scores, values, valid, bias, scale, self.stride,
                                   self.implementation)
    b, ho, wo = out.shape[:3]
    out = out.reshape(b, ho, wo, up, up, self.num_queries, self.features).sum(axis=5)
    out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, ho * up, wo * up, self.features)
    return nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                    kernel_init=self.kernel_init, name='to_out')(out.astype(self.dtype))
