"""Direct, slow float64 references: gather every window, build keys, explicit softmax."""
import jax
import jax.numpy as jnp
import numpy as np


def random_params(module, x, seed):
  """Initialised, then every leaf replaced by noise so that zero-initialised biases matter."""
  params = module.init(jax.random.key(seed), x)
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(rng.normal(scale=0.5, size=leaf.shape), jnp.float32) for leaf in leaves])


def _softmax(logits: np.ndarray, axis: int) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def qna(x, params, *, heads, kernel_size, stride=1, num_queries=2, upsample=1,
        padding_mask=None, normalize_queries=True):
  """QnA by definition: per window, softmax over its real pixels of q . k + B."""
  p = {k: np.asarray(v, np.float64) if not isinstance(v, dict) else v
       for k, v in params['params'].items()}
  x = np.asarray(x, np.float64)
  b, hgt, wid, _ = x.shape
  feats = p['Wk'].shape[1]
  hd = feats // heads
  nq = num_queries * upsample ** 2
  q = p['query'].reshape(nq, heads, hd)
  if normalize_queries:
    q = q / (np.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
  q = q / np.sqrt(hd)
  keys = (x @ p['Wk']).reshape(b, hgt, wid, heads, hd)
  vals = (x @ np.asarray(p['to_v']['kernel'], np.float64)).reshape(b, hgt, wid, heads, hd)
  valid = np.ones((b, hgt, wid), bool) if padding_mask is None else ~np.asarray(padding_mask)
  r = kernel_size // 2
  ho, wo = -(-hgt // stride), -(-wid // stride)
  out = np.zeros((b, ho, wo, nq, heads, hd))
  for n in range(b):
    for i in range(ho):
      for j in range(wo):
        members = [(di, dj, i * stride + di - r, j * stride + dj - r)
                   for di in range(kernel_size) for dj in range(kernel_size)]
        members = [m for m in members
                   if 0 <= m[2] < hgt and 0 <= m[3] < wid and valid[n, m[2], m[3]]]
        if not members:
          continue
        logits = np.stack([np.einsum('qhd,hd->qh', q, keys[n, y, xx]) + p['rpe_bias'][di, dj]
                           for di, dj, y, xx in members])
        attn = _softmax(logits, axis=0)  # [n, Q, h]
        for a, (di, dj, y, xx) in zip(attn, members):
          out[n, i, j] += (a * p['attn_scale_weights'][di, dj])[..., None] * vals[n, y, xx][None]
  out = out.reshape(b, ho, wo, upsample, upsample, num_queries, feats).sum(5)
  out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, ho * upsample, wo * upsample, feats)
  return out @ np.asarray(p['to_out']['kernel'], np.float64)


def window_attention(x, params, *, heads, window, padding_mask=None):
  """Self-attention inside each window x window tile over its real pixels.

  The bias table is indexed by (query - key) offsets, the released checkpoints' convention.
  """
  p = params['params']
  x = np.asarray(x, np.float64)
  b, hgt, wid, feats = x.shape
  hd = feats // heads
  qkv = (x @ np.asarray(p['to_qkv']['kernel'], np.float64)).reshape(b, hgt, wid, heads, 3, hd)
  q, k, v = qkv[..., 0, :] / np.sqrt(hd), qkv[..., 1, :], qkv[..., 2, :]
  table = np.asarray(p['rpe_bias'], np.float64)
  valid = np.ones((b, hgt, wid), bool) if padding_mask is None else ~np.asarray(padding_mask)
  out = np.zeros((b, hgt, wid, heads, hd))
  for n in range(b):
    for y in range(hgt):
      for xx in range(wid):
        y0, x0 = y - y % window, xx - xx % window
        keys = [(ky, kx) for ky in range(y0, min(y0 + window, hgt))
                for kx in range(x0, min(x0 + window, wid)) if valid[n, ky, kx]]
        if not keys:
          continue
        logits = np.stack([
            np.einsum('hd,hd->h', q[n, y, xx], k[n, ky, kx])
            + table[(y - ky + window - 1) * (2 * window - 1) + (xx - kx + window - 1)]
            for ky, kx in keys])
        attn = _softmax(logits, axis=0)
        out[n, y, xx] = sum(a[:, None] * v[n, ky, kx] for a, (ky, kx) in zip(attn, keys))
  return out.reshape(b, hgt, wid, feats) @ np.asarray(p['to_out']['kernel'], np.float64)
