"""DETR and its transformer on a tiny backbone: shapes, parameter layout, masking, dtypes."""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from qna_detr.backbones.base import FeatureMap
from qna_detr.detectors.detr.model import DETR
from qna_detr.detectors.detr.transformer import Transformer

STRIDE = 4


class PatchBackbone(nn.Module):
  """Non-overlapping stride-4 patches: padding that is a multiple of 4 leaves valid features
  unchanged, so any difference in the head's predictions comes from the head."""

  @nn.compact
  def __call__(self, images: jax.Array, padding_mask: jax.Array, *,
               train: bool) -> Sequence[FeatureMap]:
    features = nn.Conv(8, (STRIDE, STRIDE), strides=STRIDE, padding='VALID')(images)
    return [FeatureMap(features, padding_mask[:, ::STRIDE, ::STRIDE])]


def tiny_detr(**overrides) -> DETR:
  sizes = dict(num_classes=3, num_queries=5, hidden_dim=16, num_heads=2, num_encoder_layers=1,
               num_decoder_layers=3, dim_feedforward=32)
  return DETR(PatchBackbone(), **{**sizes, **overrides})


def tiny_transformer() -> Transformer:
  return Transformer(d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=2,
                     dim_feedforward=16, dropout=0.1)


def init(model: nn.Module, *args) -> dict:
  return jax.jit(model.init, static_argnames='train')(jax.random.key(0), *args, train=False)


def jit_apply(model: nn.Module):
  """Compiled forward pass: op-by-op dispatch of a whole transformer is slow on CPU."""
  return jax.jit(model.apply, static_argnames='train')


@pytest.fixture(scope='module')
def model_and_params():
  model = tiny_detr()
  return model, init(model, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16), bool))


def test_output_structure_and_parameter_groups(model_and_params):
  model, variables = model_and_params
  images = jax.random.normal(jax.random.key(1), (2, 24, 32, 3))
  out = jit_apply(model)(variables, images, jnp.zeros((2, 24, 32), bool), train=False)
  assert out['pred_logits'].shape == (2, 5, 4) and out['pred_logits'].dtype == jnp.float32
  assert out['pred_boxes'].shape == (2, 5, 4) and out['pred_boxes'].dtype == jnp.float32
  assert len(out['aux_outputs']) == 2
  for aux in out['aux_outputs']:
    assert set(aux) == {'pred_logits', 'pred_boxes'}
    assert aux['pred_logits'].shape == (2, 5, 4) and aux['pred_boxes'].shape == (2, 5, 4)
  assert ((out['pred_boxes'] > 0) & (out['pred_boxes'] < 1)).all()
  params = variables['params']
  assert 'backbone' in params and 'Conv_0' in params['backbone']
  assert 'query_embed' in params and params['query_embed'].shape == (5, 16)
  decoder_norms = [k for k in params['transformer'] if 'norm' in k]
  assert decoder_norms == ['decoder_norm']  # one final norm shared by all decoder outputs


def test_padding_does_not_change_predictions(model_and_params):
  model, variables = model_and_params
  rng = np.random.default_rng(0)
  small = rng.normal(size=(12, 20, 3)).astype(np.float32)
  large = rng.normal(size=(24, 28, 3)).astype(np.float32)
  apply = jit_apply(model)
  alone = apply(variables, small[None], np.zeros((1, 12, 20), bool), train=False)

  images = np.zeros((2, 24, 28, 3), np.float32)
  mask = np.ones((2, 24, 28), bool)
  images[0, :12, :20], mask[0, :12, :20] = small, False
  images[0, 12:, :] = images[0, :, 20:] = 7.0  # Padding content must not matter either.
  images[1], mask[1] = large, False
  batched = apply(variables, images, mask, train=False)
  for key in ('pred_logits', 'pred_boxes'):
    np.testing.assert_allclose(batched[key][0], alone[key][0], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(batched['aux_outputs'][0][key][0],
                               alone['aux_outputs'][0][key][0], atol=2e-5, rtol=1e-4)


def test_transformer_ignores_padded_tokens():
  transformer = tiny_transformer()
  keys = jax.random.split(jax.random.key(0), 4)
  src = jax.random.normal(keys[0], (1, 6, 8))
  pos = jax.random.normal(keys[1], (1, 6, 8))
  queries = jax.random.normal(keys[2], (3, 8))
  mask = jnp.array([[False, False, False, False, True, True]])
  variables = init(transformer, src, mask, pos, queries)
  apply = jit_apply(transformer)
  out = apply(variables, src, mask, pos, queries, train=False)
  assert out.shape == (2, 1, 3, 8)
  changed = src.at[:, 4:].set(100.0)
  np.testing.assert_allclose(
      apply(variables, changed, mask, pos.at[:, 4:].set(-3.0), queries, train=False),
      out, atol=1e-5)
  unmasked = apply(variables, changed, jnp.zeros_like(mask), pos, queries, train=False)
  assert np.abs(unmasked - out).max() > 1e-3  # ...while an unmasked change does matter.


def reference_transformer(params: dict, src: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                          query_pos: np.ndarray) -> np.ndarray:
  """DETR's post-norm transformer for one image, in numpy, from the paper's equations."""
  def attention(p, query, key, value, key_padding=None):
    p = p['attn']
    project = lambda x, name: np.einsum('sd,dhk->shk', x, p[name]['kernel']) + p[name]['bias']
    q, k, v = project(query, 'query'), project(key, 'key'), project(value, 'value')
    scores = np.einsum('qhk,shk->hqs', q, k) / np.sqrt(q.shape[-1])
    if key_padding is not None:
      scores = np.where(key_padding[None, None, :], -np.inf, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = np.einsum('hqs,shk->qhk', weights, v)
    return np.einsum('qhk,hkd->qd', heads, p['out']['kernel']) + p['out']['bias']

  def norm(p, x):
    centered = x - x.mean(-1, keepdims=True)
    return centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-5) * p['scale'] + p['bias']

  def ffn(p, x):
    hidden = np.maximum(x @ p['linear1']['kernel'] + p['linear1']['bias'], 0)
    return hidden @ p['linear2']['kernel'] + p['linear2']['bias']

  def residual(p, name, x, branch):
    return norm(p[name]['norm'], x + branch)

  params = jax.tree.map(np.asarray, params)
  memory = src
  p = params['encoder_0']
  memory = residual(p, 'residual1', memory,
                    attention(p['self_attn'], memory + pos, memory + pos, memory, mask))
  memory = residual(p, 'residual2', memory, ffn(p['ffn'], memory))
  tgt, outputs = np.zeros_like(query_pos), []
  for i in range(2):
    p = params[f'decoder_{i}']
    tgt = residual(p, 'residual1', tgt,
                   attention(p['self_attn'], tgt + query_pos, tgt + query_pos, tgt))
    tgt = residual(p, 'residual2', tgt,
                   attention(p['cross_attn'], tgt + query_pos, memory + pos, memory, mask))
    tgt = residual(p, 'residual3', tgt, ffn(p['ffn'], tgt))
    outputs.append(norm(params['decoder_norm'], tgt))
  return np.stack(outputs)


def test_transformer_matches_a_numpy_reference():
  transformer = tiny_transformer()
  rng = np.random.default_rng(0)
  src, pos = rng.normal(size=(2, 1, 6, 8)).astype(np.float32)
  queries = rng.normal(size=(3, 8)).astype(np.float32)
  mask = np.array([[False, False, True, False, False, True]])
  variables = init(transformer, src, mask, pos, queries)
  # Non-zero biases and norm offsets, so that every parameter shows in the result.
  params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32),
                        variables['params'])
  out = jit_apply(transformer)({'params': params}, src, mask, pos, queries, train=False)
  np.testing.assert_allclose(out[:, 0], reference_transformer(params, src[0], mask[0], pos[0],
                                                              queries), atol=1e-4, rtol=1e-4)


def test_dropout_uses_the_dropout_rng(model_and_params):
  model, variables = model_and_params
  images, mask = jnp.ones((1, 16, 16, 3)), jnp.zeros((1, 16, 16), bool)
  apply = jit_apply(model)
  run = lambda seed: apply(variables, images, mask, train=True,
                           rngs={'dropout': jax.random.key(seed)})['pred_logits']
  np.testing.assert_array_equal(run(0), run(0))
  assert np.abs(run(0) - run(1)).max() > 0


def test_bfloat16_compute_is_finite_with_float32_params_and_outputs():
  model = tiny_detr(dtype=jnp.bfloat16, aux_loss=False)
  images = 100 * jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
  mask = jnp.zeros((2, 16, 24), bool).at[1, 8:].set(True)
  variables = init(model, images, mask)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = jit_apply(model)(variables, images, mask, train=False)
  assert out['aux_outputs'] == []
  for key in ('pred_logits', 'pred_boxes'):
    assert out[key].dtype == jnp.float32 and np.isfinite(out[key]).all()


def test_rejects_bad_arguments(model_and_params):
  model, variables = model_and_params
  with pytest.raises(ValueError, match='padding_mask'):
    model.apply(variables, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8, 16), bool), train=False)
  with pytest.raises(ValueError, match='num_heads'):
    init(tiny_detr(num_heads=3), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8), bool))
  with pytest.raises(ValueError, match='hidden_dim'):
    init(tiny_detr(hidden_dim=18), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8), bool))


class ContentFreeBackbone(nn.Module):
  """The same feature vector at every position, at strides 4 (8 channels) and 8 (12)."""

  @nn.compact
  def __call__(self, images: jax.Array, padding_mask: jax.Array, *,
               train: bool) -> Sequence[FeatureMap]:
    batch, height, width = padding_mask.shape
    return [FeatureMap(jnp.ones((batch, height // s, width // s, c)), padding_mask[:, ::s, ::s])
            for s, c in ((4, 8), (8, 12))]


@pytest.mark.parametrize('position_at_input', [False, True])
def test_only_position_at_input_tells_the_head_where_content_is(position_at_input):
  """Content-free features: attention then averages identical values, so without the position
  encoding among the values the predictions cannot depend on the image's layout at all."""
  model = DETR(ContentFreeBackbone(), num_classes=3, num_queries=5, hidden_dim=16, num_heads=2,
               num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32,
               position_at_input=position_at_input)
  square, wide = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 32, 3))
  variables = init(model, square, jnp.zeros((1, 16, 16), bool))
  boxes = [jit_apply(model)(variables, x, jnp.zeros(x.shape[:3], bool), train=False)
           ['pred_boxes'] for x in (square, wide)]
  difference = float(jnp.abs(boxes[0] - boxes[1]).max())
  if position_at_input:
    assert difference > 1e-3
  else:
    assert difference < 1e-5


@pytest.mark.parametrize('level,channels', [(0, 8), (-1, 12)])
def test_feature_level_picks_the_backbone_map(level, channels):
  model = DETR(ContentFreeBackbone(), num_classes=3, num_queries=5, hidden_dim=16, num_heads=2,
               num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
               feature_levels=(level,))
  variables = init(model, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16), bool))
  assert variables['params']['input_proj']['kernel'].shape == (channels, 16)
