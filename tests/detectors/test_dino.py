"""DINO's pieces against hand-computed values, torch's own masks, a direct loop, and its
switches (the reference comparison is test_dino_reference.py)."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.backbones.base import FeatureMap
from qna_detr.detectors import base
from qna_detr.detectors.dino import denoising
from qna_detr.detectors.dino.model import DINO, nearest_resize
from qna_detr.detectors.dino.postprocess import postprocess

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')


def test_nearest_resize_is_torchs():
  """torch's F.interpolate(mode='nearest') of the fixture's image mask, written by torch."""
  reference = np.load(os.path.join(TESTDATA, 'dino_tiny.npz'))
  image = jnp.asarray(reference['input/image_mask'])
  for i in range(3):
    want = reference[f'input/mask_{i}']
    np.testing.assert_array_equal(nearest_resize(image, want.shape[1:]), want)
  # Hand-computed: 25 rows to 13 read rows floor(i * 25 / 13).
  rows = nearest_resize(jnp.arange(25)[None, :, None] * jnp.ones((1, 1, 1), int), (13, 1))
  assert np.asarray(rows)[0, :, 0].tolist() == [0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]


def test_postprocess_takes_the_best_query_class_pairs():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 3)).astype(np.float32)
  boxes = rng.uniform(0.2, 0.6, (2, 6, 4)).astype(np.float32)
  sizes = np.array([[100, 200], [50, 80]])
  out = postprocess({'pred_logits': logits, 'pred_boxes': boxes}, sizes, top_k=5)
  for b in range(2):  # A direct loop over every (query, class) pair.
    pairs = sorted(((1 / (1 + np.exp(-logits[b, q, c])), q, c) for q in range(6)
                    for c in range(3)), reverse=True)[:5]
    height, width = sizes[b]
    for k, (score, q, c) in enumerate(pairs):
      cx, cy, w, h = boxes[b, q]
      assert out['scores'][b, k] == pytest.approx(score, rel=1e-6)
      assert out['labels'][b, k] == c
      np.testing.assert_allclose(out['boxes'][b, k], [(cx - w / 2) * width,
                                                      (cy - h / 2) * height, w * width,
                                                      h * height], rtol=1e-5)


def test_denoising_layout_by_hand():
  """Two images with 2 and 1 boxes, dn_number 50: 100 // (2 x 2) = 25 groups of 4 slots
  (positives 0-1, negatives 2-3); the second image's second slot of each half holds no box."""
  boxes = jnp.asarray([[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.4, 0.2], [0, 0, 0, 0]],
                       [[0.5, 0.4, 0.2, 0.4], [0, 0, 0, 0], [0, 0, 0, 0]]], jnp.float32)
  labels = jnp.asarray([[1, 2, 0], [3, 0, 0]])
  box_mask = jnp.asarray([[True, True, False], [True, False, False]])
  slots = denoising.num_slots(50, 3)
  zero = denoising.Noise(flip=jnp.ones((2, slots)), new_label=jnp.zeros((2, slots), int),
                         sign=jnp.ones((2, slots, 4)), amount=jnp.zeros((2, slots, 4)))
  dn = denoising.build(boxes, labels, box_mask, zero, dn_number=50, label_noise=0.5,
                       box_noise=1.0, num_queries=7)
  assert slots == 100 and int(dn.groups) == 25 and bool(dn.exists.all())
  within = np.arange(slots) % 4
  np.testing.assert_array_equal(dn.has_box[0], np.ones(slots, bool))
  np.testing.assert_array_equal(dn.has_box[1], within % 2 == 0)
  np.testing.assert_array_equal(dn.target[0], np.where(within < 2, within, -1))
  np.testing.assert_array_equal(dn.target[1], np.where(within == 0, 0, -1))
  np.testing.assert_array_equal(dn.labels[0, :4], [1, 2, 1, 2])
  # No movement for positives (amount 0); every corner of a negative moves by one half size
  # (amount 0 + 1, sign +1): the box shifts by half its size.
  sigmoid = jax.nn.sigmoid(dn.boxes)
  np.testing.assert_allclose(sigmoid[0, 0], [0.3, 0.3, 0.2, 0.2], atol=1e-6)
  np.testing.assert_allclose(sigmoid[0, 2], [0.4, 0.4, 0.2, 0.2], atol=1e-6)
  blocked = np.asarray(dn.attention_blocked)
  assert blocked[slots:, :slots].all() and not blocked[slots:, slots:].any()
  assert not blocked[:4, :4].any() and blocked[:4, 4:slots].all()
  assert not blocked[:slots, slots:].any()  # Denoising queries see the matching ones.


class _Levels(nn.Module):
  """Two random feature levels (strides 8 and 16)."""

  @nn.compact
  def __call__(self, images, padding_mask, *, train):
    del train
    return [FeatureMap(nn.Conv(c, (s, s), strides=s, name=f'conv{s}')(images),
                       padding_mask[:, ::s, ::s]) for s, c in ((8, 8), (16, 12))]


def _dino(dn_number=50, **switches):
  return DINO(backbone=_Levels(), num_classes=3, feature_levels=(0, 1), num_feature_levels=3,
              hidden_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=2,
              dim_feedforward=16, num_queries=6, enc_points=2, dec_points=2,
              dn_number=dn_number, **switches)


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
  mask = jnp.zeros((2, 64, 64), bool).at[1, :, 48:].set(True)
  targets = {'boxes': jnp.asarray(rng.uniform(0.2, 0.5, (2, 3, 4)), jnp.float32),
             'labels': jnp.asarray([[0, 1, 2], [2, 0, 0]]),
             'box_mask': jnp.asarray([[True, True, True], [True, False, False]])}
  params = _dino().init(jax.random.PRNGKey(0), images, mask, train=False)['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)  # Away from the zero-initialized box heads.
  return images, mask, targets, params


def test_ancestors_are_switches_of_one_module(inputs):
  """Deformable DETR (learned anchors, no refinement, no denoising) and its two-stage form
  run on the same parameters; only two-stage has the encoder's outputs, only denoising the
  denoising ones."""
  images, mask, targets, params = inputs
  variants = {'deformable_detr': dict(two_stage=False, box_refinement=False,
                                      look_forward_twice=False, dn_number=0),
              'two_stage': dict(two_stage=True, box_refinement=True, look_forward_twice=False,
                                dn_number=0),
              'dino': {}}
  anchors = {'refpoint_embed': jnp.full((6, 4), 0.1)}
  for name, switches in variants.items():
    variant_params = {**params, **anchors} if not switches.get('two_stage', True) else params
    out = _dino(**switches).apply({'params': variant_params}, images, mask, train=True,
                                  targets=targets, rngs={'dropout': jax.random.PRNGKey(3),
                                                         'denoise': jax.random.PRNGKey(4)})
    assert out['pred_boxes'].shape == (2, 6, 4) and len(out['aux_outputs']) == 1, name
    assert ('interm_outputs' in out) == switches.get('two_stage', True), name
    assert ('dn_outputs' in out) == (switches.get('dn_number', 50) > 0), name


def test_look_forward_twice_changes_gradients_not_predictions(inputs):
  """The last layer's boxes are the same either way; with it, their gradient reaches the
  first decoder layer through its refined anchors too, so the gradients differ."""
  images, mask, targets, params = inputs

  def boxes(switch, p):
    out = _dino(look_forward_twice=switch, dn_number=0).apply(
        {'params': p}, images, mask, train=False)
    return out['pred_boxes']

  np.testing.assert_allclose(boxes(True, params), boxes(False, params), rtol=1e-6)
  grads = {s: jax.grad(lambda p, s=s: boxes(s, p).sum())(params)['decoder_0'] for s in
           (True, False)}
  differ = [not np.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in
            zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False]))]
  assert any(differ)


def test_denoising_noise_comes_from_its_named_stream(inputs):
  """The same step key draws the same noise (a resumed run draws what an uninterrupted one
  did); another step's key other noise; the dropout stream is the step key itself."""
  images, mask, targets, params = inputs
  module = _dino()

  def dn_boxes(step):
    rng = jax.random.fold_in(jax.random.PRNGKey(7), step)
    rngs = {name: base.stream_key(rng, name) for name in ('dropout', 'denoise')}
    out = module.apply({'params': params}, images, mask, train=True, targets=targets,
                       rngs=rngs)
    return np.asarray(out['dn'].boxes)

  np.testing.assert_array_equal(dn_boxes(3), dn_boxes(3))
  assert not np.allclose(dn_boxes(3), dn_boxes(4))
  key = jax.random.PRNGKey(5)
  assert base.stream_key(key, 'dropout') is key
