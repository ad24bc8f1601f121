"""The frozen backbone's feature cache: its contents, its batch order, and its train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr import detectors
from qna_detr import parallel
from qna_detr.data import batching
from qna_detr.data import pipeline
from qna_detr.data import toy
from qna_detr.train import feature_cache
from qna_detr.train import train_step
from qna_detr.train import optimizer
from qna_detr.train import phases
import train_testing


@pytest.fixture
def setup(toy_dir):
  config = phases.prepare(train_testing.micro_config(toy_dir), toy_dir)
  config.optimizer.freeze_backbone = True
  model = detectors.build(config, len(toy.CLASSES))
  tx, _ = optimizer.build_optimizer(config, epoch_steps=1, total_steps=1)
  state = train_step.initial_state(config, model, tx, jax.random.PRNGKey(3), (64, 64))
  images = pipeline.build_dataset(config, split='train', global_batch_size=4, shuffle_seed=0,
                                  train=False)
  return config, model, state, images


def _backbone_features(detector, params, images, mask):
  """The last feature map, by the backbone module itself (not the detector's helper)."""
  return detector.module.backbone.apply({'params': params}, images, mask, train=False)[-1]


def test_cache_holds_features_of_every_image_and_its_mirror_image(setup):
  config, model, state, images = setup
  backbone = state.params['backbone']
  cache = feature_cache.build(model, backbone, images)
  expected = {'features': [], 'boxes': []}
  for batch in images.iterator():
    keep = batch['valid']
    mirrored = np.zeros_like(batch['inputs'])
    for i, (height, width) in enumerate(batch['size']):
      mirrored[i, :height, :width] = np.flip(batch['inputs'][i, :height, :width], axis=1)
    flipped_boxes = batch['boxes'].copy()
    flipped_boxes[..., 0] = 1.0 - flipped_boxes[..., 0]  # Centre x mirrored; w, h, cy kept.
    flipped_boxes[~batch['box_mask']] = batch['boxes'][~batch['box_mask']]
    for inputs, boxes in [(batch['inputs'], batch['boxes']), (mirrored, flipped_boxes)]:
      features = _backbone_features(model, backbone, inputs, batch['padding_mask']).features
      expected['features'].append(np.asarray(features)[keep])
      expected['boxes'].append(boxes[keep])
  num_images = images.num_examples
  assert len(cache) == 2 * num_images
  features, = cache.features  # The micro DETR reads one level.
  np.testing.assert_allclose(features, np.concatenate(expected['features']),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cache.targets['boxes'], np.concatenate(expected['boxes']),
                             atol=1e-7)
  # Mirroring moves the features: the second half is not a copy of the first.
  assert not np.allclose(features[:4], features[4:8], atol=1e-3)


def test_batches_cover_every_entry_once_an_epoch_in_a_new_order():
  size, batch_size = 10, 3
  ids = np.arange(size, dtype=np.float32)
  cache = feature_cache.FeatureCache(
      features=(ids[:, None, None, None], -ids[:, None, None, None]),
      padding_mask=(np.zeros((size, 1, 1), bool),) * 2,
      targets={'boxes': np.zeros((size, 1, 4), np.float32),
               'labels': np.zeros((size, 1), np.int32), 'box_mask': np.ones((size, 1), bool)})
  epoch = lambda e: [cache.batch(3 * e + s, batch_size, seed=5)['inputs'][0].ravel()
                     for s in (1, 2, 3)]
  first, second = np.concatenate(epoch(0)), np.concatenate(epoch(1))
  assert len(set(first.tolist())) == 9 and len(set(second.tolist())) == 9  # No repeats.
  assert not np.array_equal(first, second)
  # A batch depends on (seed, step) alone: a resumed run reads what an uninterrupted one did.
  fifth = cache.batch(5, batch_size, seed=5)['inputs']
  np.testing.assert_array_equal(fifth[0].ravel(), second[3:6])
  np.testing.assert_array_equal(fifth[1].ravel(), -second[3:6])  # Levels stay together.
  resumed = feature_cache.batches(cache, first_step=5, batch_size=batch_size, seed=5)
  np.testing.assert_array_equal(next(resumed)['inputs'][0].ravel(), second[3:6])
  with pytest.raises(ValueError, match='fewer than the batch'):
    cache.batch(1, 11, seed=0)


def test_a_step_on_cached_features_equals_a_step_on_the_images(setup):
  config, model, state, images = setup
  frozen = train_step.frozen_mask(config, model)
  tx, schedules = optimizer.build_optimizer(config, epoch_steps=10, total_steps=10, mask=frozen)
  batch = next(iter(images.iterator()))
  mesh = parallel.data_mesh()
  sharding = parallel.batch_sharding(mesh)
  targets = {k: batch[k] for k in ('boxes', 'labels', 'box_mask')}
  features = _backbone_features(model, state.params['backbone'], batch['inputs'],
                                batch['padding_mask'])
  head = model.on_features()
  results = []
  for step_model, inputs, mask in [(model, batch['inputs'], batch['padding_mask']),
                                   (head, (np.asarray(features.features),),
                                    (np.asarray(features.mask),))]:
    step = train_step.jit_step(config, step_model, tx, schedules, frozen, mesh)
    arrays = batching.to_global_arrays({'inputs': inputs, 'padding_mask': mask, **targets},
                                       sharding)
    with jax.set_mesh(mesh):
      new_state, metrics = step(jax.tree.map(jnp.copy, state), arrays)
    results.append((jax.device_get(new_state.params), float(metrics['loss'])))
  (from_images, loss_images), (from_cache, loss_cache) = results
  assert loss_cache == pytest.approx(loss_images, rel=1e-5)
  for a, b in zip(jax.tree.leaves(from_images), jax.tree.leaves(from_cache), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  moved = jax.tree.leaves(jax.device_get(state.params['transformer']))
  assert any(not np.allclose(a, b) for a, b in
             zip(moved, jax.tree.leaves(from_cache['transformer'])))
