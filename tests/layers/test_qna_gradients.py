"""The window softmax's gradients, in every implementation, against autodiff of a direct
implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.layers.qna import IMPLEMENTATIONS, window_softmax_aggregate


def direct(scores, values, valid, bias, scale, stride):
  """Gathers every k x k window and applies an explicit masked softmax (no shared sums)."""
  k = bias.shape[0]
  p = k // 2
  b, hgt, wid = scores.shape[:3]
  ho, wo = -(-hgt // stride), -(-wid // stride)
  pad = ((0, 0), (p, p), (p, p))
  s = jnp.pad(scores, pad + ((0, 0), (0, 0)))
  v = jnp.pad(values, pad + ((0, 0), (0, 0)))
  m = jnp.pad(valid, pad)
  def take(x, i, j):
    return x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
  logits = jnp.stack([take(s, i, j) + bias[i, j] for i in range(k) for j in range(k)])
  present = jnp.stack([take(m, i, j) for i in range(k) for j in range(k)])[..., None, None]
  logits = jnp.where(present, logits, -jnp.inf)
  any_present = present.any(0)
  attn = jax.nn.softmax(jnp.where(any_present, logits, 0.0), axis=0) * present
  weighted = attn * scale.reshape(k * k, 1, 1, 1, *scale.shape[2:])
  gathered = jnp.stack([take(v, i, j) for i in range(k) for j in range(k)])  # [k2,B,Ho,Wo,h,d]
  return jnp.einsum('nbyxqh,nbyxhd->byxqhd', weighted, gathered)


@pytest.mark.parametrize('implementation', [name for name in IMPLEMENTATIONS if name != 'auto'])
@pytest.mark.parametrize('kernel,stride', [(3, 1), (3, 2), (5, 1), (5, 2)])
@pytest.mark.parametrize('score_scale', [1.0, 1e3])  # 1e3: the exact path.
def test_gradients_match_direct_autodiff(kernel, stride, score_scale, implementation):
  rng = np.random.default_rng(kernel * 10 + stride)
  b, hgt, wid, nq, nh, hd = 2, 7, 9, 2, 3, 4
  scores = jnp.asarray(score_scale * rng.normal(size=(b, hgt, wid, nq, nh)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(b, hgt, wid, nh, hd)), jnp.float32)
  valid = jnp.asarray(rng.random((b, hgt, wid)) > 0.2)
  valid = valid.at[1, :, 5:].set(False)  # Some windows see padding only.
  bias = jnp.asarray(rng.normal(size=(kernel, kernel, nq, nh)), jnp.float32)
  scale = jnp.asarray(rng.normal(size=(kernel, kernel, nq, nh)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(b, -(-hgt // stride), -(-wid // stride), nq, nh, hd)),
                          jnp.float32)

  def aggregate(*args):
    return window_softmax_aggregate(*args, implementation)

  def loss(fn):
    return lambda s, v, bi, sc: jnp.sum(fn(s, v, valid, bi, sc, stride) * cotangent)

  got = jax.grad(loss(aggregate), argnums=(0, 1, 2, 3))(scores, values, bias, scale)
  want = jax.grad(loss(direct), argnums=(0, 1, 2, 3))(scores, values, bias, scale)
  args = (scores, values, valid, bias, scale, stride)
  np.testing.assert_allclose(aggregate(*args), direct(*args), rtol=1e-4, atol=1e-5)
  for name, a, w in zip(('scores', 'values', 'bias', 'scale'), got, want):
    assert np.isfinite(np.asarray(a)).all(), name
    np.testing.assert_allclose(a, w, rtol=2e-4, atol=2e-5 * float(np.abs(w).max()), err_msg=name)
