"""QnA's window sums as depthwise convolutions, differentiated by autodiff: the accelerator path.

This is the authors' formulation: every window sum is one `conv_general_dilated` with one
group per channel, and its cotangents (autodiff's transposes) are convolutions too, so the
compiled program has the same operations whatever the window size, each one convolution that
accelerator compilers hand to their convolution kernels. On CPUs it is several times slower
than `qna_slices`: XLA's CPU backend computes a depthwise kernel gradient as a dense
convolution over every pair of channels.
"""
import math

import jax
import jax.numpy as jnp

from qna_detr.layers import qna_softmax

Array = jax.Array


def window_sum(x: Array, kernel: Array, stride: int) -> Array:
  """`qna_softmax.WindowSum` as a depthwise convolution over x's flattened trailing dims.

  Explicit padding (p, p) gives ceil(H / stride) outputs, centred like the other paths'.
  float32 runs at full precision (no TF32); bfloat16 accumulates in float32.
  """
  k = kernel.shape[0]
  p = k // 2
  channels = x.shape[3:]
  size = math.prod(channels)
  kernel = jnp.broadcast_to(kernel, (k, k) + channels).reshape(k, k, 1, size)
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  out = jax.lax.conv_general_dilated(
      x.reshape(x.shape[:3] + (size,)), kernel.astype(x.dtype), (stride, stride),
      ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=size,
      precision=precision, preferred_element_type=jnp.float32)
  return out.reshape(out.shape[:3] + channels)


def _fast_aggregate(scores, values, valid, bias, scale, stride):
  return qna_softmax.fast_aggregate(window_sum, scores, values, valid, bias, scale, stride)


aggregate = qna_softmax.with_exact_fallback(qna_softmax.autodiff_path(_fast_aggregate))
