"""QnA attention made explicit: per-window softmax weights, per-pixel attention maps, kernels.

The QnA layer never forms its window attention (it computes two window sums, Algorithm 1 of
the supplement). To look at it, this module gathers every k x k window of the layer's scores
and takes the softmax explicitly, from the layer's own parameters:

  a[o, n, q, h] = softmax over the real pixels n of window o of (S[n, q, h] + B[n - o, q, h])

with S = X (W_K q) (queries unit-normalized per head and scaled by 1/sqrt(d_h), exactly as the
layer does) and B the relative position bias. These are the weights that the layer's
normalizer divides by; the attention scale weights Ws multiply the numerator only, so they
are not part of a (the layer's output is Sum_n a * Ws * V, see `aggregate`).

Memory is O(k^2 H W Q h): fine for visualization, not for training.
"""
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qna_detr.layers import masking
from qna_detr.layers import windows
from qna_detr.layers.qna import fused_query_keys

Array = jax.Array
_MASKED = -1e30  # Logit of a pixel outside the image or padded: its exp() is exactly 0.


def scores(x: Array, params: Mapping[str, Array], heads: int,
           normalize_queries: bool = True) -> Array:
  """The layer's fused query-key scores S = X (W_K q): [B, H, W, Q, h] float32."""
  query_keys = fused_query_keys(jnp.asarray(params['query'], jnp.float32),
                                jnp.asarray(params['Wk'], jnp.float32), heads, normalize_queries)
  return jnp.einsum('bywc,cqh->bywqh', jnp.asarray(x, jnp.float32), query_keys)


def window_weights(x: Array, padding_mask: Array | None, params: Mapping[str, Array], *,
                   heads: int, stride: int, normalize_queries: bool = True) -> Array:
  """The softmax weights of every window: [B, Ho, Wo, k, k, Q, h], summing to 1 per window.

  x: the QnA layer's input [B, H, W, C] (after the block's LayerNorm); padding_mask: [B, H, W]
  True at padded pixels, which get weight 0 (as do positions outside the map). A window without
  a real pixel gets all zeros, as the layer returns zeros there.
  """
  bias = jnp.asarray(params['rpe_bias'], jnp.float32)  # [k, k, Q, h]
  k = bias.shape[0]
  valid = masking.valid_from_padding(padding_mask, x.shape)
  real = windows.gather(valid, k, stride, fill=False)[..., None, None]  # [B, Ho, Wo, k, k, 1, 1]
  logits = windows.gather(scores(x, params, heads, normalize_queries), k, stride) + bias
  logits = jnp.where(real, logits, _MASKED)
  top = logits.max(axis=(3, 4), keepdims=True)
  e = jnp.where(real, jnp.exp(logits - top), 0.0)
  total = e.sum(axis=(3, 4), keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def aggregate(weights: Array, values: Array, scale: Array, stride: int) -> Array:
  """Sum_n a * Ws * V per window: [B, Ho, Wo, Q, h, d] from values [B, H, W, h, d].

  What the QnA layer computes before summing queries and projecting (for checks).
  """
  k = weights.shape[3]
  gathered = windows.gather(values, k, stride)  # [B, Ho, Wo, k, k, h, d]
  return jnp.einsum('byxijqh,ijqh,byxijhd->byxqhd', weights, jnp.asarray(scale, jnp.float32),
                    gathered.astype(jnp.float32))


def attention_map(weights: Array, height: int, width: int, stride: int,
                  padding_mask: Array | None = None) -> Array:
  """Per input pixel, the sum of the weights that all windows containing it put on it.

  The supplement's Figure 1. weights: [B, Ho, Wo, k, k, ...] from `window_weights`; returns
  [B, H, W, ...]. With `padding_mask` ([B, H, W], True = padding), windows centred on padding
  are left out: their outputs are padding, which the following layers ignore. Every other
  window with a real pixel contributes a total of 1, so the map sums to their number; padded
  pixels get 0.
  """
  if padding_mask is not None:
    centred = ~jnp.asarray(padding_mask, bool)[:, ::stride, ::stride]
    weights = weights * centred.reshape(centred.shape + (1,) * (weights.ndim - 3))
  return windows.scatter_add(weights, height, width, stride)


def window_mosaic(weights: Array) -> np.ndarray:
  """[Ho, Wo, k, k] -> [Ho * k, Wo * k]: each window's k x k kernel as a tile in its place.

  The supplement's Figure 2 (kernels tiled side by side instead of overlapped).
  """
  ho, wo, k, _ = weights.shape
  return np.asarray(weights).transpose(0, 2, 1, 3).reshape(ho * k, wo * k)


def bias_kernels(params: Mapping[str, Array]) -> np.ndarray:
  """softmax(B) over each k x k window: [k, k, Q, h], the content-free part of the kernel
  (the window weights when all scores in it are equal)."""
  bias = np.asarray(params['rpe_bias'], np.float64)
  e = np.exp(bias - bias.max(axis=(0, 1), keepdims=True))
  return (e / e.sum(axis=(0, 1), keepdims=True)).astype(np.float32)
