"""Dense pretraining: its targets, its output layout, and the phase: result, reuse, resume."""
import shutil

from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr import detectors
from qna_detr.backbones import registry
from qna_detr.backbones import weights
from qna_detr.backbones.base import FeatureMap
from qna_detr.train import dense_pretraining
from qna_detr.train import trainer
from qna_detr.train import phases
import train_testing


def _maps_by_loop(boxes, labels, box_mask, sizes, grid, cell, num_classes):
  """Per cell and box, in pixels: is the cell's centre inside the box?"""
  out = np.zeros((len(boxes), *grid, num_classes), np.float32)
  for b in range(len(boxes)):
    height, width = sizes[b]
    for n in np.nonzero(box_mask[b])[0]:
      cx, cy, w, h = boxes[b, n] * [width, height, width, height]
      for i in range(grid[0]):
        for j in range(grid[1]):
          y, x = (i + 0.5) * cell, (j + 0.5) * cell
          if cy - h / 2 <= y <= cy + h / 2 and cx - w / 2 <= x <= cx + w / 2:
            out[b, i, j, labels[b, n]] = 1.0
  return out


def test_box_class_maps_match_a_per_cell_loop():
  rng = np.random.default_rng(0)
  batch, boxes_per_image, classes, grid, cell = 3, 5, 4, (9, 12), 4.0
  centres = rng.uniform(0.1, 0.9, (batch, boxes_per_image, 2))
  extents = rng.uniform(0.05, 0.6, (batch, boxes_per_image, 2))
  boxes = np.concatenate([centres, extents], -1).astype(np.float32)
  labels = rng.integers(0, classes, (batch, boxes_per_image)).astype(np.int32)
  box_mask = rng.uniform(size=(batch, boxes_per_image)) < 0.7
  sizes = np.array([[36, 48], [30, 41], [36, 29]], np.int32)  # Unpadded (h, w) per image.
  got = dense_pretraining.box_class_maps(jnp.asarray(boxes), jnp.asarray(labels),
                                         jnp.asarray(box_mask), jnp.asarray(sizes), grid, cell,
                                         classes)
  want = _maps_by_loop(boxes, labels, box_mask, sizes, grid, cell, classes)
  assert want.sum() > 20 and (want == 0).sum() > 20  # Both kinds of cells are tested.
  np.testing.assert_array_equal(np.asarray(got), want)


def _edges_by_loop(boxes, box_mask, sizes, grid, cell):
  """Per cell, in pixels: the smallest box around its centre and the distances to its edges."""
  edges = np.zeros((len(boxes), *grid, 4), np.float32)
  inside = np.zeros((len(boxes), *grid), bool)
  for b in range(len(boxes)):
    height, width = sizes[b]
    for i in range(grid[0]):
      for j in range(grid[1]):
        y, x = (i + 0.5) * cell, (j + 0.5) * cell
        around = []
        for n in np.nonzero(box_mask[b])[0]:
          cx, cy, w, h = boxes[b, n] * [width, height, width, height]
          if cy - h / 2 <= y <= cy + h / 2 and cx - w / 2 <= x <= cx + w / 2:
            around.append((w * h, cx, cy, w, h))
        if around:
          _, cx, cy, w, h = min(around)
          inside[b, i, j] = True
          edges[b, i, j] = [(x - cx + w / 2) / width, (y - cy + h / 2) / height,
                            (cx + w / 2 - x) / width, (cy + h / 2 - y) / height]
  return edges, inside


def test_box_edge_targets_match_a_per_cell_loop():
  rng = np.random.default_rng(2)
  batch, boxes_per_image, grid, cell = 3, 6, (10, 11), 4.0
  centres = rng.uniform(0.2, 0.8, (batch, boxes_per_image, 2))
  extents = rng.uniform(0.1, 0.7, (batch, boxes_per_image, 2))
  boxes = np.concatenate([centres, extents], -1).astype(np.float32)
  box_mask = rng.uniform(size=(batch, boxes_per_image)) < 0.8
  sizes = np.array([[40, 44], [33, 40], [40, 31]], np.int32)
  edges, inside = dense_pretraining.box_edge_targets(
      jnp.asarray(boxes), jnp.asarray(box_mask), jnp.asarray(sizes), grid, cell)
  want_edges, want_inside = _edges_by_loop(boxes, box_mask, sizes, grid, cell)
  counts = np.zeros(want_inside.shape, int)  # Boxes around each centre: overlaps are tested.
  for b, n in zip(*np.nonzero(box_mask)):
    counts[b] += _edges_by_loop(boxes[b:b + 1, n:n + 1], box_mask[b:b + 1, n:n + 1],
                                sizes[b:b + 1], grid, cell)[1][0]
  assert (counts >= 2).sum() > 10 and (counts == 0).sum() > 10
  np.testing.assert_array_equal(np.asarray(inside), want_inside)
  np.testing.assert_allclose(np.asarray(edges)[want_inside], want_edges[want_inside], atol=1e-6)


class _GivenFeatures(nn.Module):
  """A stand-in backbone: returns the images themselves as its one feature map."""

  @nn.compact
  def __call__(self, images, padding_mask, train=False):
    return [FeatureMap(images, padding_mask)]


def test_heads_put_each_sub_cell_where_it_belongs():
  upsample, classes = 2, 4  # Both heads have upsample^2 * 4 outputs: diagonal kernels.
  channels = upsample * upsample * classes
  features = np.random.default_rng(1).normal(size=(2, 3, 4, channels))
  mask = np.zeros(features.shape[:3], bool)
  mask[1, 2:, :] = True
  model = dense_pretraining.DenseHeads(_GivenFeatures(), classes, upsample)
  identity = {'kernel': jnp.eye(channels), 'bias': jnp.zeros(channels)}
  params = {'head': identity, 'edge_head': {'kernel': -2 * jnp.eye(channels),
                                            'bias': jnp.zeros(channels)}}
  logits, edges, out_mask = model.apply({'params': params}, jnp.asarray(features, jnp.float32),
                                        jnp.asarray(mask), train=False)
  assert logits.shape == (2, 3 * upsample, 4 * upsample, classes)
  assert edges.shape == (2, 3 * upsample, 4 * upsample, 4)
  for b, i, j, a, c in np.ndindex(2, 3, 4, upsample, upsample):
    # Sub-cell (a, c) of cell (i, j) reads channels [(a * upsample + c) * width, ...).
    sub_cell = (b, i * upsample + a, j * upsample + c)
    first = (a * upsample + c) * classes
    np.testing.assert_allclose(logits[sub_cell], features[b, i, j, first:first + classes],
                               rtol=1e-6)
    first = (a * upsample + c) * 4
    np.testing.assert_allclose(edges[sub_cell], -2 * features[b, i, j, first:first + 4],
                               rtol=1e-6)
    assert out_mask[sub_cell] == mask[b, i, j]


def _dense_losses(config, params, batch) -> tuple[float, float, float, float]:
  """Over real sub-cells: the class maps' BCE of (params, the best constant guess: each class's
  rate) and the edges' L1 over sub-cells inside a box of (params, the best constant guess: each
  coordinate's median)."""
  model = dense_pretraining.DenseHeads(registry.build(config.model), 5,
                                       config.backbone_pretraining.upsample)
  logits, edges, mask = model.apply({'params': params}, batch['inputs'], batch['padding_mask'],
                                    train=False)
  targets = dense_pretraining.box_class_maps(batch['boxes'], batch['labels'], batch['box_mask'],
                                             batch['size'], logits.shape[1:3], 4.0, 5)
  valid = np.asarray(~mask, np.float32)[..., None]
  rate = (np.asarray(targets) * valid).sum((0, 1, 2)) / valid.sum()

  def bce(p):
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    per_cell = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean(-1, keepdims=True)
    return float((per_cell * valid).sum() / valid.sum())

  target_edges, inside = dense_pretraining.box_edge_targets(
      batch['boxes'], batch['box_mask'], batch['size'], logits.shape[1:3], 4.0)
  in_box = np.asarray(inside) & (valid[..., 0] > 0)
  target_edges = np.asarray(target_edges)[in_box]
  l1 = lambda e: float(np.abs(e - target_edges).mean())  # noqa: E731
  return (bce(jax.nn.sigmoid(logits)), bce(np.broadcast_to(rate, targets.shape)),
          l1(np.asarray(edges)[in_box]), l1(np.median(target_edges, axis=0)))


def _pretrain(config, workdir):
  return dense_pretraining.run(config, str(workdir), metric_writers.LoggingWriter())


@pytest.mark.slow  # End to end.
def test_pretraining_lowers_its_loss_and_the_detector_loads_it(tmp_path):
  config = train_testing.micro_config(str(tmp_path / 'data'))
  config.backbone_pretraining.update(dict(steps=200, warmup_steps=10))
  config.checkpoint_every_steps = 1000
  config = phases.prepare(config, str(tmp_path))
  path = _pretrain(config, tmp_path)
  assert path == str(tmp_path / 'backbone_pretraining' / 'checkpoints' / '200')

  train_ds, _ = trainer.build_datasets(config)
  iterator = iter(train_ds.tf_dataset)
  params, _ = weights.read(path)
  losses = [_dense_losses(config, params,
                          {k: jnp.asarray(v.numpy()) for k, v in next(iterator).items()
                           if k in dense_pretraining.BATCH_KEYS}) for _ in range(3)]
  bce, bce_constant, edge_l1, edge_l1_constant = np.mean(losses, axis=0)
  assert bce < 0.75 * bce_constant, losses  # It reads the images.
  assert edge_l1 < 0.9 * edge_l1_constant, losses  # 0.80 when written.

  detector = detectors.build(config, 5)
  abstract = jax.eval_shape(lambda k: detector.init(k, (64, 64)), jax.random.PRNGKey(0))
  _, report = weights.load_backbone(abstract, path, backbone=config.model.backbone)
  assert report.matched and not report.missing and not report.unexpected

  # A second call finds the result and trains nothing.
  mtime = (tmp_path / 'backbone_pretraining' / 'checkpoints' / '200').stat().st_mtime_ns
  assert _pretrain(config, tmp_path) == path
  assert (tmp_path / 'backbone_pretraining' / 'checkpoints' / '200').stat().st_mtime_ns == mtime
  # Other settings are refused, naming the key, rather than reusing this result.
  config.backbone_pretraining.edge_weight = 1.0
  with pytest.raises(ValueError, match=r'config\.backbone_pretraining\.edge_weight'):
    _pretrain(config, tmp_path)


@pytest.mark.slow  # End to end.
def test_a_killed_pretraining_resumes_exactly(tmp_path):
  """The phase checkpoints as it goes: with its last checkpoint gone (killed after step 2),
  a rerun continues from step 2 and ends where the uninterrupted phase ended."""
  config = train_testing.micro_config(str(tmp_path / 'data'))
  config.backbone_pretraining.update(dict(steps=4, warmup_steps=1))
  config.checkpoint_every_steps = 2
  config = phases.prepare(config, str(tmp_path))
  path = _pretrain(config, tmp_path / 'run')
  straight, _ = weights.read(path)
  shutil.rmtree(path)
  assert _pretrain(config, tmp_path / 'run') == path
  resumed, _ = weights.read(path)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  at_two, _ = weights.read(str(tmp_path / 'run' / 'backbone_pretraining' / 'checkpoints' / '2'))
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(at_two), jax.tree.leaves(straight)))


@pytest.mark.parametrize('overrides,key', [
    (dict(steps=10, warmup_steps=5, path='ckpt'), 'config.pretrained.path'),
    (dict(steps=10, warmup_steps=10), 'config.backbone_pretraining.warmup_steps'),
    (dict(steps=10, warmup_steps=5, edge_weight=-1.0), 'config.backbone_pretraining.edge_weight'),
])
def test_bad_pretraining_config_names_the_key(tmp_path, overrides, key):
  config = train_testing.micro_config(str(tmp_path / 'data'))
  config.pretrained.path = overrides.pop('path', '')
  config.backbone_pretraining.update(overrides)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    phases.prepare(config, str(tmp_path))
