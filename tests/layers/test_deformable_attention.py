"""Multi-scale deformable attention against a direct float64 reference: a loop over queries,
heads, levels and points with explicit bilinear weights (the contract of Deformable DETR's
`ms_deform_attn_core_pytorch`: `grid_sample` at 2 * loc - 1, align_corners=False, zeros
outside), its vector-Jacobian product written out by hand, and the module's projections."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.layers import deformable_attention as da

IMPLEMENTATIONS = [i for i in da.IMPLEMENTATIONS if i != 'auto']
# Levels of different sizes, a single-pixel one among them.
SHAPES = ((5, 7), (3, 4), (1, 1))


def _corners(x: float, y: float, height: int, width: int):
  """The reference's bilinear corners of pixel coordinate (x, y) (cell centres at integers):
  (row, col, weight, d weight / dx, d weight / dy), only those inside the map."""
  x0, y0 = int(np.floor(x)), int(np.floor(y))
  fx, fy = x - x0, y - y0
  for dy, dx in itertools.product((0, 1), (0, 1)):
    row, col = y0 + dy, x0 + dx
    if 0 <= row < height and 0 <= col < width:
      wx, wy = (fx if dx else 1 - fx), (fy if dy else 1 - fy)
      yield row, col, wx * wy, (1 if dx else -1) * wy, (1 if dy else -1) * wx


def reference(value, shapes, locations, weights, grad=None):
  """Output [B, Lq, M * D] (and, given the output's cotangent, the cotangents of value,
  locations and weights), in float64 by loops."""
  value, locations, weights = (np.asarray(a, np.float64) for a in (value, locations, weights))
  batch, _, heads, depth = value.shape
  queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
  starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])])
  out = np.zeros((batch, queries, heads, depth))
  d_value, d_loc, d_weight = np.zeros_like(value), np.zeros_like(locations), np.zeros_like(weights)
  g = None if grad is None else np.asarray(grad, np.float64).reshape(out.shape)
  for b, q, m, l, p in itertools.product(range(batch), range(queries), range(heads),
                                         range(levels), range(points)):
    height, width = shapes[l]
    x = locations[b, q, m, l, p, 0] * width - 0.5
    y = locations[b, q, m, l, p, 1] * height - 0.5
    a = weights[b, q, m, l, p]
    for row, col, w, dwdx, dwdy in _corners(x, y, height, width):
      v = value[b, starts[l] + row * width + col, m]
      out[b, q, m] += a * w * v
      if g is not None:
        d_value[b, starts[l] + row * width + col, m] += a * w * g[b, q, m]
        d_weight[b, q, m, l, p] += w * v @ g[b, q, m]
        d_loc[b, q, m, l, p, 0] += a * dwdx * width * (v @ g[b, q, m])
        d_loc[b, q, m, l, p, 1] += a * dwdy * height * (v @ g[b, q, m])
  out = out.reshape(batch, queries, heads * depth)
  return out if g is None else (out, d_value, d_loc, d_weight)


def _inputs(seed=0, batch=2, queries=6, heads=2, depth=4, points=2, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  length = sum(h * w for h, w in shapes)
  value = rng.normal(size=(batch, length, heads, depth)).astype(np.float32)
  # Inside and outside [0, 1]: points off the map sample zeros (or one edge row).
  locations = rng.uniform(-0.3, 1.3, (batch, queries, heads, len(shapes), points, 2))
  weights = rng.dirichlet(np.ones(len(shapes) * points), (batch, queries, heads))
  return (value, locations.astype(np.float32),
          weights.reshape(batch, queries, heads, len(shapes), points).astype(np.float32))


def _rel(actual, expected) -> float:
  return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_sampling_equals_the_reference_in_float32(implementation):
  value, locations, weights = _inputs()
  out = da.sample(value, SHAPES, locations, weights, implementation)
  assert out.dtype == jnp.float32
  assert _rel(out, reference(value, SHAPES, locations, weights)) <= 1e-5


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_sampling_in_bfloat16_keeps_float32_locations(implementation):
  value, locations, weights = _inputs(seed=1)
  out = da.sample(jnp.asarray(value, jnp.bfloat16), SHAPES, locations, weights, implementation)
  assert out.dtype == jnp.bfloat16
  assert _rel(out, reference(value, SHAPES, locations, weights)) <= 2e-2


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
def test_gradients_equal_the_reference(implementation):
  value, locations, weights = _inputs(seed=2)
  grad = np.random.default_rng(3).normal(size=(value.shape[0], locations.shape[1],
                                               value.shape[2] * value.shape[3]))
  _, vjp = jax.vjp(lambda v, l, w: da.sample(v, SHAPES, l, w, implementation),
                   value, locations, weights)
  got = vjp(jnp.asarray(grad, jnp.float32))
  _, *expected = reference(value, SHAPES, locations, weights, grad)
  for name, g, e in zip(('value', 'locations', 'weights'), got, expected):
    assert _rel(g, e) <= 1e-5, name


def test_a_point_at_a_pixel_centre_reads_that_pixel():
  """Hand-computed: location ((j + 0.5) / W, (i + 0.5) / H) is pixel (i, j) alone; half a
  pixel beyond the map's edge reads half the edge pixel."""
  value = np.arange(12, dtype=np.float32).reshape(1, 12, 1, 1)  # One 3 x 4 map.
  locations = np.array([[(2.5 / 4, 1.5 / 3), (0.0 / 4, 1.5 / 3), (4.0 / 4, 2.5 / 3)]],
                       np.float32).reshape(1, 3, 1, 1, 1, 2)
  out = da.sample(value, ((3, 4),), locations, np.ones((1, 3, 1, 1, 1), np.float32))
  np.testing.assert_allclose(np.asarray(out)[0, :, 0], [6.0, 0.5 * 4, 0.5 * 11], rtol=1e-6)


def _module_reference(params, query, reference_points, value, shapes, padding_mask, heads,
                      points):
  """MSDeformAttn's projections around the float64 sampling reference."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  dense = lambda x, name: x @ p[name]['kernel'] + p[name]['bias']
  batch, queries, d_model = query.shape
  levels = len(shapes)
  values = np.where(padding_mask[..., None], 0.0, dense(value, 'value_proj'))
  values = values.reshape(batch, -1, heads, d_model // heads)
  offsets = dense(query, 'sampling_offsets').reshape(batch, queries, heads, levels, points, 2)
  logits = dense(query, 'attention_weights').reshape(batch, queries, heads, levels * points)
  attention = np.exp(logits - logits.max(-1, keepdims=True))
  attention = (attention / attention.sum(-1, keepdims=True)).reshape(offsets.shape[:-1])
  ref = reference_points[:, :, None, :, None, :]
  if reference_points.shape[-1] == 2:
    locations = ref + offsets / np.array([[w, h] for h, w in shapes])[:, None, :]
  else:
    locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
  sampled = reference(values, shapes, locations, attention)
  return dense(sampled, 'output_proj')


@pytest.mark.parametrize('box_dim', [2, 4])
def test_module_with_padding_equals_the_reference(box_dim):
  rng = np.random.default_rng(4)
  d_model, heads, points, batch, queries = 16, 2, 3, 2, 5
  length = sum(h * w for h, w in SHAPES)
  query = rng.normal(size=(batch, queries, d_model)).astype(np.float32)
  value = rng.normal(size=(batch, length, d_model)).astype(np.float32)
  padding_mask = rng.uniform(size=(batch, length)) < 0.3  # Padded positions count as zero.
  reference_points = rng.uniform(0, 1, (batch, queries, len(SHAPES), box_dim)).astype(
      np.float32)
  module = da.MSDeformAttn(d_model, len(SHAPES), heads, points)
  params = module.init(jax.random.PRNGKey(0), query, reference_points, value, SHAPES,
                       padding_mask)['params']
  # Random projections (the initial ones are zeros and a fixed grid).
  params = jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32),
                        params)
  out = module.apply({'params': params}, query, reference_points, value, SHAPES, padding_mask)
  expected = _module_reference(params, query, reference_points, value, SHAPES, padding_mask,
                               heads, points)
  assert _rel(out, expected) <= 1e-5


def test_initial_offsets_are_the_references_grid():
  """Hand-computed for 4 heads, 2 points: directions 0, 90, 180, 270 degrees (unit max-norm),
  point p at p + 1 steps."""
  init = da._offset_bias_init(heads=4, levels=1, points=2)  # pylint: disable=protected-access
  grid = np.asarray(init(None, (4 * 1 * 2 * 2,))).reshape(4, 1, 2, 2)
  np.testing.assert_allclose(grid[:, 0, 0], [[1, 0], [0, 1], [-1, 0], [0, -1]], atol=1e-6)
  np.testing.assert_allclose(grid[:, 0, 1], 2 * grid[:, 0, 0], atol=1e-6)


@pytest.mark.optimized
def test_memory_does_not_hold_the_values_per_sampling_point():
  """Forward + backward at a 4-level size: the compiled temporaries stay far below one copy
  of the gathered values per query and corner ([Lq, L * P * 4, D] per head)."""
  shapes = ((40, 60), (20, 30), (10, 15), (5, 8))
  length = sum(h * w for h, w in shapes)
  heads, depth, points = 8, 32, 4
  args = (jax.ShapeDtypeStruct((1, length, heads, depth), jnp.float32),
          jax.ShapeDtypeStruct((1, length, heads, 4, points, 2), jnp.float32),
          jax.ShapeDtypeStruct((1, length, heads, 4, points), jnp.float32))

  def loss(v, l, w):
    return da.sample(v, shapes, l, w, 'gather').sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  gathered_copy = length * heads * 4 * points * 4 * depth * 4  # bytes
  assert compiled.memory_analysis().temp_size_in_bytes < gathered_copy / 2
