"""SASA against a direct float64 loop: gather each neighbourhood, explicit softmax."""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.layers.sasa import SASA

HEADS = 4
FEATURES = 16


def sasa_reference(x: np.ndarray, params: dict, *, heads: int, kernel_size: int,
                   padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Per pixel: softmax over the real pixels of its k x k neighbourhood of q . k + B."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['params'])
  x = np.asarray(x, np.float64)
  b, hgt, wid, feats = x.shape
  hd = feats // heads
  q, keys, vals = ((x @ p[name]['kernel']).reshape(b, hgt, wid, heads, hd)
                   for name in ('to_q', 'to_k', 'to_v'))
  q = q / np.sqrt(hd)
  valid = np.ones((b, hgt, wid), bool) if padding_mask is None else ~np.asarray(padding_mask)
  r = kernel_size // 2
  out = np.zeros((b, hgt, wid, heads, hd))
  for n in range(b):
    for y in range(hgt):
      for xx in range(wid):
        members = [(i, j, y + i - r, xx + j - r)
                   for i in range(kernel_size) for j in range(kernel_size)]
        members = [m for m in members
                   if 0 <= m[2] < hgt and 0 <= m[3] < wid and valid[n, m[2], m[3]]]
        if not members:
          continue
        logits = np.stack([(q[n, y, xx] * keys[n, ky, kx]).sum(-1) + p['rpe_bias'][i, j]
                           for i, j, ky, kx in members])  # [members, h]
        attn = np.exp(logits - logits.max(axis=0))
        attn /= attn.sum(axis=0)
        out[n, y, xx] = sum(a[:, None] * vals[n, ky, kx]
                            for a, (_, _, ky, kx) in zip(attn, members))
  return out.reshape(b, hgt, wid, feats) @ p['to_out']['kernel']


def _inputs(kernel_size: int, seed: int = 0) -> tuple[SASA, dict, np.ndarray, np.ndarray]:
  """Odd-sized inputs; image 1 is padded bottom/right, so some neighbourhoods are all padding."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, 7, 9, FEATURES)).astype(np.float32)
  mask = np.zeros((2, 7, 9), bool)
  mask[1, 4:] = True
  mask[1, :, 5:] = True
  layer = SASA(FEATURES, HEADS, kernel_size)
  params = layer.init(jax.random.PRNGKey(seed), x, mask)
  # A random position bias, so a transposed or flipped offset would show.
  bias = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, HEADS)), jnp.float32)
  return layer, {'params': {**params['params'], 'rpe_bias': bias}}, x, mask


def _relative_error(out: jax.Array, ref: np.ndarray) -> float:
  """Largest absolute error relative to the largest reference magnitude."""
  return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize('kernel_size', [1, 3, 5, 9])
@pytest.mark.parametrize('masked', [False, True])
def test_matches_loop_reference(kernel_size: int, masked: bool):
  layer, params, x, mask = _inputs(kernel_size)
  mask = mask if masked else None
  out = layer.apply(params, x, mask)
  ref = sasa_reference(x, params, heads=HEADS, kernel_size=kernel_size, padding_mask=mask)
  assert _relative_error(out, ref) <= 1e-5


def test_all_padding_neighbourhood_gives_zeros_and_finite_grads():
  layer, params, x, mask = _inputs(3)
  out = layer.apply(params, x, mask)
  # Pixel (6, 8) of image 1: its 3 x 3 neighbourhood (rows 5-6, columns 7-8) is all padding.
  np.testing.assert_array_equal(np.asarray(out[1, 6, 8]), 0.0)
  grads = jax.grad(lambda p, x: layer.apply(p, x, mask).sum(), argnums=(0, 1))(params, x)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_padded_batch_matches_image_alone():
  """Padding an image into a batch must not change its real pixels' outputs."""
  layer, params, x, mask = _inputs(5)
  batched = layer.apply(params, x, mask)[1, :4, :5]
  alone = layer.apply(params, x[1:, :4, :5])[0]
  np.testing.assert_allclose(np.asarray(batched), np.asarray(alone), rtol=1e-5, atol=1e-6)


def test_rejects_bad_config():
  x = jnp.zeros((1, 4, 4, FEATURES))
  with pytest.raises(ValueError, match='kernel_size'):
    SASA(FEATURES, HEADS, 4).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='multiple of heads'):
    SASA(FEATURES, 3, 3).init(jax.random.PRNGKey(0), x)
