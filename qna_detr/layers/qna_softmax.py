"""The QnA window softmax's numerical contract, shared by every implementation.

An implementation supplies a fast path: window sums of exponentials shifted by a maximum that
is constant inside every window (`fast_aggregate`, given its own window-sum operator), and the
cotangents of that path. `with_exact_fallback` turns it into the full window softmax: when a
fast-path normalizer falls into the range where its terms lose precision (a window whose scores
all sit ~35 nats below the image maximum), the call is recomputed, forward and backward, with
the exact per-window maximum, visiting the k^2 window offsets in a loop (so the compiled
program does not grow with k^2); it is never taken for ordinary activations.
"""
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from qna_detr.layers import masking
from qna_detr.layers import windows

Array = jax.Array
# (x [B, H, W, ...], kernel [k, k, ...] broadcasting against x's trailing dims, stride) ->
# [B, ceil(H / stride), ceil(W / stride), ...] float32: 'same'-padded window sums.
WindowSum = Callable[[Array, Array, int], Array]
Grads = tuple[Array, Array, Array, Array]  # Cotangents of scores, values, bias and scale.

# Normalizers below this (about e^-34.5) mean the shifted exponentials may have lost precision.
# Its square must stay a normal float32: the division's gradient divides by den^2.
MIN_SAFE_NORMALIZER = 1e-15
# Stands in for -inf on padded scores: exp() of it is exactly 0 and its gradient is finite.
MASKED_SCORE = -1e30


def fast_weights(scores: Array, valid: Array, bias: Array) -> tuple[Array, Array]:
  """exp(S) and exp(B), each shifted by a maximum that is constant inside every window.

  S is shifted per (image, query, head) over valid pixels, B per (query, head); padded pixels
  get weight 0.
  """
  masked = jnp.where(valid[..., None, None], scores, MASKED_SCORE)
  shift = jax.lax.stop_gradient(jnp.max(masked, axis=(1, 2), keepdims=True))
  weights = jnp.where(valid[..., None, None], jnp.exp(masked - shift), 0.0)  # [B,H,W,Q,h]
  bias_exp = jnp.exp(bias - jax.lax.stop_gradient(jnp.max(bias, axis=(0, 1))))  # [k,k,Q,h]
  return weights, bias_exp


def inverse(den: Array) -> Array:
  """1 / den, and 0 where den is too small to trust (a window without a valid pixel, or an
  underflowed fast-path normalizer)."""
  trusted = den >= MIN_SAFE_NORMALIZER
  return jnp.where(trusted, 1.0 / jnp.where(trusted, den, 1.0), 0.0)


def fast_aggregate(window_sum: WindowSum, scores: Array, values: Array, valid: Array,
                   bias: Array, scale: Array, stride: int) -> tuple[Array, Array]:
  """Window softmax as two window sums (Algorithm 1), with `window_sum` doing the sums.

  Returns the output [B, Ho, Wo, Q, h, d] and whether every window's normalizer is safe.
  """
  weights, bias_exp = fast_weights(scores, valid, bias)
  weighted_values = weights[..., None].astype(values.dtype) * values[:, :, :, None]
  num = window_sum(weighted_values, (bias_exp * scale)[..., None], stride)
  den = window_sum(weights, bias_exp, stride)
  window_has_valid = masking.window_any(valid, bias.shape[0], stride)  # [B, Ho, Wo]
  safe = jnp.all((den >= MIN_SAFE_NORMALIZER) | ~window_has_valid[..., None, None])
  return num * inverse(den)[..., None], safe


def _exact_setup(scores, values, valid, bias, stride):
  """Padded inputs, the offset views, and a function giving exp(logit - window max) at an
  offset (0 where the pixel is padding or outside the image)."""
  k = bias.shape[0]
  hgt, wid = scores.shape[1:3]
  views = windows.OffsetViews(k, stride, windows.output_size(hgt, stride),
                              windows.output_size(wid, stride))
  masked = windows.pad(jnp.where(valid[..., None, None], scores, MASKED_SCORE), k,
                       MASKED_SCORE)
  values = windows.pad(values, k)
  valid = windows.pad(valid, k, False)
  flat_bias = bias.reshape(k * k, *bias.shape[2:])

  def logits(offset):
    return views.gather(masked, offset) + flat_bias[offset]

  first = logits(0)
  window_max = jax.lax.fori_loop(1, k * k, lambda o, m: jnp.maximum(m, logits(o)), first)

  def weight(offset):
    present = views.gather(valid, offset)[..., None, None]
    return jnp.where(present, jnp.exp(logits(offset) - window_max), 0.0)

  return views, values, weight


def exact_aggregate(scores: Array, values: Array, valid: Array, bias: Array, scale: Array,
                    stride: int) -> Array:
  """Window softmax with the exact per-window maximum, one window offset at a time."""
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
  return num * inverse(den)[..., None]


def exact_grads(scores: Array, values: Array, valid: Array, bias: Array, scale: Array,
                stride: int, g_out: Array, g: Array) -> Grads:
  """Cotangents of the exact path from normalized attention a, one offset at a time:
  dl = a (Ws (g . V) - g . out) for every logit l = S + B, dWs = a (g . V), dV = a Ws g."""
  k = bias.shape[0]
  pad = (k - 1) // 2
  views, padded_values, weight = _exact_setup(scores, values, valid, bias, stride)
  inv = inverse(jax.lax.fori_loop(0, k * k, lambda o, d: d + weight(o),
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


class FastPath(NamedTuple):
  """An implementation's fast path.

  forward(scores, values, valid, bias, scale, stride) -> (out, safe): `fast_aggregate` with
    the implementation's window sums.
  backward(scores, values, valid, bias, scale, stride, g_out, g) -> Grads: the cotangents of
    scores, values, bias and scale for the output cotangent g (float32), with
    g_out = Sum_d g * out [B, Ho, Wo, Q, h], all the normalizer's cotangent needs of the
    output; recomputed from the inputs, so no residual outlives the forward pass but the
    inputs and the output.
  branch_backward: whether `backward` runs inside the conditional that picks it or the exact
    path's cotangents (leaner: its buffers are the branch's), rather than before it (XLA's CPU
    backend runs a depthwise convolution's kernel gradient inside a conditional tens of times
    slower than outside).
  """
  forward: Callable[..., tuple[Array, Array]]
  backward: Callable[..., Grads]
  branch_backward: bool


def autodiff_path(aggregate: Callable[..., tuple[Array, Array]]) -> FastPath:
  """The FastPath of a differentiable `fast_aggregate`-like function: its cotangents are
  autodiff's, of the forward pass recomputed in the backward pass."""
  def backward(scores, values, valid, bias, scale, stride, g_out, g):
    del g_out

    def differentiable(s, v, b, sc):
      return aggregate(s, v, valid, b, sc, stride)[0]
    return jax.vjp(differentiable, scores, values, bias, scale)[1](g)

  return FastPath(aggregate, backward, branch_backward=False)


def with_exact_fallback(fast: FastPath) -> Callable[..., Array]:
  """The window softmax of `fast`, which falls back to the exact path, forward and backward,
  when a fast-path normalizer is unsafe.

  Both paths are under one custom VJP, so the exact path's loops are never differentiated.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def aggregate(scores, values, valid, bias, scale, stride):
    return _forward(scores, values, valid, bias, scale, stride)[0]

  def _forward(scores, values, valid, bias, scale, stride):
    fast_out, safe = fast.forward(scores, values, valid, bias, scale, stride)
    out = jax.lax.cond(safe, lambda *_: fast_out,
                       lambda *args: exact_aggregate(*args, stride),
                       scores, values, valid, bias, scale)
    return out, (scores, values, valid, bias, scale, out, safe)

  def _backward(stride, saved, g):
    *inputs, out, safe = saved
    g = g.astype(jnp.float32)
    # Passed to the branches instead of the output: a conditional's operands may be copied.
    g_out = (g * out).sum(-1)
    precomputed = None if fast.branch_backward else fast.backward(*inputs, stride, g_out, g)

    def fast_grads(*args):
      if precomputed is not None:
        return precomputed
      return fast.backward(*args[:5], stride, *args[5:])

    d_scores, d_values, d_bias, d_scale = jax.lax.cond(
        safe, fast_grads, lambda *args: exact_grads(*args[:5], stride, *args[5:]),
        *inputs, g_out, g)
    return d_scores, d_values, None, d_bias, d_scale

  aggregate.defvjp(_forward, _backward)
  return aggregate
