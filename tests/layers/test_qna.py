"""QnA against a direct gather-and-softmax reference, plus its numerical guarantees."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import local_attention_reference as reference
from qna_detr.layers.qna import QnA



def _relative_error(got, want):
  return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def _mask(batch, hgt, wid, seed):
  """Rectangular image extents (bottom/right padding) plus a few holes."""
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, hgt, wid), bool)
  for n in range(batch):
    mask[n, :rng.integers(hgt // 2, hgt + 1), :rng.integers(wid // 2, wid + 1)] = False
  mask |= rng.random(mask.shape) < 0.1
  return mask


CASES = [
    # kernel, stride, queries, heads, (H, W), masked, upsample
    (1, 1, 1, 1, (5, 7), False, 1),
    (3, 1, 2, 4, (9, 11), False, 1),
    (3, 2, 2, 2, (9, 12), True, 1),
    (5, 1, 3, 2, (8, 13), True, 1),
    (7, 2, 1, 4, (11, 9), False, 1),
    (5, 2, 2, 8, (7, 6), True, 1),
    (3, 1, 1, 2, (6, 5), True, 2),
    (3, 1, 2, 2, (5, 4), False, 3),
]


@pytest.mark.parametrize('kernel,stride,queries,heads,size,masked,upsample', CASES)
def test_matches_reference_float32(kernel, stride, queries, heads, size, masked, upsample):
  x = np.random.default_rng(1).normal(size=(2, *size, 16)).astype(np.float32)
  mask = _mask(2, *size, seed=2) if masked else None
  layer = QnA(16, heads, kernel, stride=stride, num_queries=queries, upsample=upsample)
  params = reference.random_params(layer, x, seed=3)
  got = layer.apply(params, x, mask)
  want = reference.qna(x, params, heads=heads, kernel_size=kernel, stride=stride,
                       num_queries=queries, upsample=upsample, padding_mask=mask)
  assert got.shape == want.shape
  assert _relative_error(got, want) <= 1e-5


@pytest.mark.parametrize('kernel,stride,queries,heads,size,masked,upsample', CASES[1:4])
def test_matches_reference_bfloat16(kernel, stride, queries, heads, size, masked, upsample):
  x = np.random.default_rng(4).normal(size=(2, *size, 16)).astype(np.float32)
  mask = _mask(2, *size, seed=5) if masked else None
  layer = QnA(16, heads, kernel, stride=stride, num_queries=queries, dtype=jnp.bfloat16)
  params = reference.random_params(layer, x, seed=6)
  got = layer.apply(params, x, mask)
  assert got.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  want = reference.qna(x, params, heads=heads, kernel_size=kernel, stride=stride,
                       num_queries=queries, padding_mask=mask)
  assert _relative_error(got, want) <= 2e-2


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
@pytest.mark.parametrize('stride', [1, 2])
def test_large_inputs_stay_finite_and_exact(dtype, tol, stride):
  """Inputs x1e3 put windows ~1e4 nats apart: the authors' exp(scores) overflows here."""
  x = 1e3 * np.random.default_rng(7).normal(size=(2, 9, 10, 16)).astype(np.float32)
  mask = _mask(2, 9, 10, seed=8)
  layer = QnA(16, 4, 3, stride=stride, dtype=dtype)
  params = reference.random_params(layer, x / 1e3, seed=9)
  got = layer.apply(params, x, mask)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  want = reference.qna(x, params, heads=4, kernel_size=3, stride=stride, padding_mask=mask)
  assert _relative_error(got, want) <= tol
  grads = jax.grad(lambda p, x: layer.apply(p, x, mask).astype(jnp.float32).sum(),
                   argnums=(0, 1))(params, x)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_windows_of_padding_only_give_zeros():
  x = np.random.default_rng(10).normal(size=(1, 12, 12, 8)).astype(np.float32)
  mask = np.zeros((1, 12, 12), bool)
  mask[:, :, 6:] = True  # right half padded: windows centred at column >= 8 see no real pixel
  layer = QnA(8, 2, 5)
  params = reference.random_params(layer, x, seed=11)
  got = np.asarray(layer.apply(params, x, mask))
  assert np.isfinite(got).all()
  assert np.all(got[:, :, 8:] == 0.0)
  assert np.all(np.abs(got[:, :, :8]).sum(-1) > 0)


@pytest.mark.parametrize('stride', [1, 2])
def test_shift_equivariance(stride):
  """The same content at two places gives the same outputs, shifted (away from borders)."""
  patch = np.random.default_rng(12).normal(size=(8, 8, 8)).astype(np.float32)
  canvas = np.zeros((2, 24, 24, 8), np.float32)
  canvas[0, 4:12, 4:12] = patch
  canvas[1, 12:20, 8:16] = patch  # shifted by (8, 4), a multiple of the stride
  layer = QnA(8, 2, 3, stride=stride)
  params = reference.random_params(layer, canvas, seed=13)
  out = np.asarray(layer.apply(params, canvas))
  s = stride
  first = out[0, 2 // s:14 // s, 2 // s:14 // s]
  second = out[1, 10 // s:22 // s, 6 // s:18 // s]
  np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-5)
  assert np.abs(first).max() > 1e-2


@pytest.mark.parametrize('kwargs,shape,name', [
    (dict(features=16, heads=4, kernel_size=4), (1, 8, 8, 16), 'kernel_size'),
    (dict(features=16, heads=3), (1, 8, 8, 16), 'heads'),
    (dict(features=16, heads=4, stride=0), (1, 8, 8, 16), 'stride'),
    (dict(features=16, heads=4, upsample=2, stride=2), (1, 8, 8, 16), 'upsample'),
    (dict(features=16, heads=4), (8, 8, 16), 'rank 4'),
])
def test_bad_arguments_name_themselves(kwargs, shape, name):
  with pytest.raises(ValueError, match=name):
    QnA(**kwargs).init(jax.random.key(0), jnp.zeros(shape))


def test_bad_mask_shape_is_named():
  with pytest.raises(ValueError, match='padding_mask'):
    QnA(16, 4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 16)), jnp.zeros((1, 8, 7), bool))
