"""QnA against a direct gather-and-softmax reference, plus its numerical guarantees, for every
implementation."""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import local_attention_reference as reference
from qna_detr.layers.qna import IMPLEMENTATIONS, QnA, window_softmax_aggregate

# Every implementation the platform choice ('auto') can pick.
CONCRETE = tuple(name for name in IMPLEMENTATIONS if name != 'auto')


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


@pytest.mark.parametrize('implementation', CONCRETE)
@pytest.mark.parametrize('kernel,stride,queries,heads,size,masked,upsample', CASES)
def test_matches_reference_float32(kernel, stride, queries, heads, size, masked, upsample,
                                   implementation):
  x = np.random.default_rng(1).normal(size=(2, *size, 16)).astype(np.float32)
  mask = _mask(2, *size, seed=2) if masked else None
  layer = QnA(16, heads, kernel, stride=stride, num_queries=queries, upsample=upsample,
              implementation=implementation)
  params = reference.random_params(layer, x, seed=3)
  got = layer.apply(params, x, mask)
  want = reference.qna(x, params, heads=heads, kernel_size=kernel, stride=stride,
                       num_queries=queries, upsample=upsample, padding_mask=mask)
  assert got.shape == want.shape
  assert _relative_error(got, want) <= 1e-5


@pytest.mark.parametrize('implementation', CONCRETE)
@pytest.mark.parametrize('kernel,stride,queries,heads,size,masked,upsample', CASES[1:4])
def test_matches_reference_bfloat16(kernel, stride, queries, heads, size, masked, upsample,
                                    implementation):
  x = np.random.default_rng(4).normal(size=(2, *size, 16)).astype(np.float32)
  mask = _mask(2, *size, seed=5) if masked else None
  layer = QnA(16, heads, kernel, stride=stride, num_queries=queries, dtype=jnp.bfloat16,
              implementation=implementation)
  params = reference.random_params(layer, x, seed=6)
  got = layer.apply(params, x, mask)
  assert got.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  want = reference.qna(x, params, heads=heads, kernel_size=kernel, stride=stride,
                       num_queries=queries, padding_mask=mask)
  assert _relative_error(got, want) <= 2e-2


@pytest.mark.parametrize('implementation', CONCRETE)
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
@pytest.mark.parametrize('stride', [1, 2])
def test_large_inputs_stay_finite_and_exact(dtype, tol, stride, implementation):
  """Inputs x1e3 put windows ~1e4 nats apart: the authors' exp(scores) overflows here, and
  the fast path's normalizers of windows far below the image maximum underflow, so this only
  matches the reference if the exact fallback is taken, forward and backward."""
  x = 1e3 * np.random.default_rng(7).normal(size=(2, 9, 10, 16)).astype(np.float32)
  mask = _mask(2, 9, 10, seed=8)
  layer = QnA(16, 4, 3, stride=stride, dtype=dtype, implementation=implementation)
  params = reference.random_params(layer, x / 1e3, seed=9)
  got = layer.apply(params, x, mask)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  want = reference.qna(x, params, heads=4, kernel_size=3, stride=stride, padding_mask=mask)
  assert _relative_error(got, want) <= tol
  grads = jax.grad(lambda p, x: layer.apply(p, x, mask).astype(jnp.float32).sum(),
                   argnums=(0, 1))(params, x)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('implementation', CONCRETE)
def test_windows_of_padding_only_give_zeros(implementation):
  x = np.random.default_rng(10).normal(size=(1, 12, 12, 8)).astype(np.float32)
  mask = np.zeros((1, 12, 12), bool)
  mask[:, :, 6:] = True  # right half padded: windows centred at column >= 8 see no real pixel
  layer = QnA(8, 2, 5, implementation=implementation)
  params = reference.random_params(layer, x, seed=11)
  got = np.asarray(layer.apply(params, x, mask))
  assert np.isfinite(got).all()
  assert np.all(got[:, :, 8:] == 0.0)
  assert np.all(np.abs(got[:, :, :8]).sum(-1) > 0)


@pytest.mark.parametrize('implementation', CONCRETE)
@pytest.mark.parametrize('stride', [1, 2])
def test_shift_equivariance(stride, implementation):
  """The same content at two places gives the same outputs, shifted (away from borders)."""
  patch = np.random.default_rng(12).normal(size=(8, 8, 8)).astype(np.float32)
  canvas = np.zeros((2, 24, 24, 8), np.float32)
  canvas[0, 4:12, 4:12] = patch
  canvas[1, 12:20, 8:16] = patch  # shifted by (8, 4), a multiple of the stride
  layer = QnA(8, 2, 3, stride=stride, implementation=implementation)
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
    (dict(features=16, heads=4, implementation='pallas'), (1, 8, 8, 16), "'pallas'.*'slices'"),
])
def test_bad_arguments_name_themselves(kwargs, shape, name):
  with pytest.raises(ValueError, match=name):
    QnA(**kwargs).init(jax.random.key(0), jnp.zeros(shape))


def test_bad_mask_shape_is_named():
  with pytest.raises(ValueError, match='padding_mask'):
    QnA(16, 4).init(jax.random.key(0), jnp.zeros((1, 8, 8, 16)), jnp.zeros((1, 8, 7), bool))


def _window_inputs(kernel: int, size: int = 12) -> tuple:
  """Random window softmax inputs: B=1, size x size, 2 queries, 2 heads of width 8."""
  rng = np.random.default_rng(kernel)
  return (jnp.asarray(rng.normal(size=(1, size, size, 2, 2)), jnp.float32),
          jnp.asarray(rng.normal(size=(1, size, size, 2, 8)), jnp.float32),
          jnp.asarray(rng.random((1, size, size)) > 0.1),
          jnp.asarray(rng.normal(size=(kernel, kernel, 2, 2)), jnp.float32),
          jnp.asarray(rng.normal(size=(kernel, kernel, 2, 2)), jnp.float32))


def _value_and_grads(implementation: str) -> Callable:
  def loss(scores, values, valid, bias, scale):
    return window_softmax_aggregate(scores, values, valid, bias, scale, 1, implementation).sum()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4)))


def test_auto_is_the_cpu_path_on_cpu():
  """On a CPU 'auto' lowers to 'slices' alone: the same results, bit for bit, and no
  convolution in its program."""
  args = _window_inputs(3)
  got, want = _value_and_grads('auto')(*args), _value_and_grads('slices')(*args)
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, w)
  assert 'convolution' not in _value_and_grads('auto').lower(*args).as_text()
  assert 'convolution' in _value_and_grads('conv').lower(*args).as_text()


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="'gpu_fused'.*'auto', 'slices', 'conv'"):
    window_softmax_aggregate(*_window_inputs(3), 1, 'gpu_fused')


@pytest.mark.optimized
@pytest.mark.parametrize('implementation', CONCRETE)
def test_memory_does_not_grow_with_window_area(implementation):
  """XLA's static temp bytes of forward + backward at k = 11 against k = 3 (13.4x the
  offsets): no buffer per window offset; the growth left is the 'same' padding of the maps."""
  def temp_bytes(kernel):
    args = _window_inputs(kernel, size=64)
    compiled = _value_and_grads(implementation).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(11) <= 1.5 * temp_bytes(3)


def test_conv_program_does_not_grow_with_window_area():
  """The accelerator path unrolls nothing per window offset: the same operations, forward and
  backward, at k = 3 and k = 11."""
  def operations(kernel):
    text = _value_and_grads('conv').lower(*_window_inputs(kernel)).as_text()
    return sorted(line.split('=', 1)[-1].split('(')[0].split()[0] for line in text.splitlines()
                  if ' = ' in line and 'stablehlo.' in line)

  assert operations(11) == operations(3)
