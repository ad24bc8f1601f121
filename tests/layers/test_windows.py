"""Window gathering shared by the local attention layers and their tools, against loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.layers import windows


def _windows_by_loop(x, k, stride, fill):
  """[B, Ho, Wo, k, k, C] by reading every pixel of every window."""
  b, h, w, c = x.shape
  ho, wo = -(-h // stride), -(-w // stride)
  out = np.full((b, ho, wo, k, k, c), fill, x.dtype)
  for y in range(ho):
    for z in range(wo):
      for i in range(k):
        for j in range(k):
          row, col = stride * y + i - k // 2, stride * z + j - k // 2
          if 0 <= row < h and 0 <= col < w:
            out[:, y, z, i, j] = x[:, row, col]
  return out


@pytest.mark.parametrize('k,stride,size', [(3, 1, (5, 7)), (3, 2, (5, 7)), (5, 2, (6, 4)),
                                           (1, 1, (3, 2))])
def test_gather_reads_every_window(k, stride, size):
  x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
  got = np.asarray(windows.gather(jnp.asarray(x), k, stride, fill=-7.0))
  want = _windows_by_loop(x, k, stride, -7.0)
  np.testing.assert_array_equal(got, want)
  flat = np.asarray(windows.gather(jnp.asarray(x), k, stride, fill=-7.0, axis=4))
  np.testing.assert_array_equal(flat, np.moveaxis(want.reshape(*want.shape[:3], k * k, 3), 3, 4))


def test_scatter_add_is_the_transpose_of_gather():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(1, 5, 7, 2)), jnp.float32)
  kernels = jnp.asarray(rng.normal(size=(1, 3, 4, 3, 3, 2)), jnp.float32)
  lhs = jnp.vdot(windows.gather(x, 3, 2), kernels)
  rhs = jnp.vdot(x, windows.scatter_add(kernels, 5, 7, 2))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_offset_views_at_a_traced_offset_equal_the_static_ones():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 6, 3)), jnp.float32)
  k, stride = 3, 2
  padded = windows.pad(x, k)
  views = windows.OffsetViews(k, stride, 4, 3)
  gather = jax.jit(views.gather)
  for i in range(k):
    for j in range(k):
      np.testing.assert_array_equal(gather(padded, i * k + j),
                                    windows.at_offset(padded, i, j, stride, 4, 3))
  acc = jax.jit(views.scatter_add)(jnp.zeros_like(padded), jnp.ones((2, 4, 3, 3)), 4)
  expected = np.zeros(padded.shape, np.float32)
  expected[:, 1:1 + 2 * 3 + 1:2, 1:1 + 2 * 2 + 1:2] = 1.0  # Offset (1, 1) of each window.
  np.testing.assert_array_equal(acc, expected)
