"""Windowed self-attention against a per-pixel gather-and-softmax reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import local_attention_reference as reference
from qna_detr.layers.window_attention import WindowAttention



@pytest.mark.parametrize('window,heads,size,masked', [
    (4, 2, (8, 8), False),
    (3, 4, (7, 11), True),   # not a multiple of the window: padded and masked
    (5, 1, (5, 12), True),
])
def test_matches_reference(window, heads, size, masked):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *size, 16)).astype(np.float32)
  mask = None
  if masked:
    mask = rng.random((2, *size)) < 0.2
    mask[1, :, size[1] // 2:] = True
  layer = WindowAttention(16, heads, window)
  params = reference.random_params(layer, x, seed=1)
  got = np.asarray(layer.apply(params, x, mask), np.float64)
  want = reference.window_attention(x, params, heads=heads, window=window, padding_mask=mask)
  keep = np.ones(size, bool)[None] if mask is None else ~mask  # padded queries are don't-care
  err = np.linalg.norm((got - want)[np.broadcast_to(keep, got.shape[:3])])
  assert err / np.linalg.norm(want[np.broadcast_to(keep, want.shape[:3])]) <= 1e-5


def test_bad_arguments():
  with pytest.raises(ValueError, match='heads'):
    WindowAttention(16, 3, 4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 16)))
  with pytest.raises(ValueError, match='rank 4'):
    WindowAttention(16, 4, 4).init(jax.random.key(0), jnp.zeros((8, 8, 16)))
