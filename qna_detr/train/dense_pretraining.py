"""Dense pretraining of the backbone on class maps and box edges drawn from the training boxes.

The paper's DETR fine-tunes an ImageNet-pretrained QnA-ViT. Where no such checkpoint exists
(the synthetic toy set, a new backbone variant), this phase is the stand-in: before DETR
trains, the backbone learns, for every sub-cell of the feature map DETR reads, which classes
have a box covering that sub-cell's centre (one sigmoid per class) and how far that box's
edges are (FCOS's regression targets, weighted by `edge_weight`), on the same training split
and input pipeline. Sub-cells finer than the feature stride (`upsample` per side) make the
features say where inside a cell an object's edges fall, which DETR's box regression reads.
The result is written as WORKDIR/backbone_pretraining/<steps>, in the format
`config.pretrained.path` reads, and reused when present.
"""
import os
import time
from typing import Any, Callable

from absl import logging
from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

from qna_detr import models
from qna_detr import parallel
from qna_detr.backbones import base
from qna_detr.data import batching
from qna_detr.data.pipeline import DetectionDataset
from qna_detr.train import steps

Array = jax.Array
BATCH_KEYS = ('inputs', 'padding_mask', 'boxes', 'labels', 'box_mask', 'size')
SUBDIR = 'backbone_pretraining'


def _centres_inside(boxes: Array, box_mask: Array, sizes: Array, grid_shape: tuple[int, int],
                    cell_size: float) -> tuple[Array, Array, Array]:
  """Cell centres normalized to each image (rows [B, gh], cols [B, gw]) and whether each
  lies inside each real box ([B, gh, gw, N])."""
  sizes = sizes.astype(jnp.float32)
  rows = (jnp.arange(grid_shape[0]) + 0.5) * cell_size / sizes[:, :1]
  cols = (jnp.arange(grid_shape[1]) + 0.5) * cell_size / sizes[:, 1:]
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)  # Each [B, N].
  in_rows = jnp.abs(rows[:, :, None] - cy[:, None]) <= h[:, None] / 2  # [B, gh, N]
  in_cols = jnp.abs(cols[:, :, None] - cx[:, None]) <= w[:, None] / 2  # [B, gw, N]
  return rows, cols, in_rows[:, :, None] & in_cols[:, None] & box_mask[:, None, None]


def box_class_maps(boxes: Array, labels: Array, box_mask: Array, sizes: Array,
                   grid_shape: tuple[int, int], cell_size: float, num_classes: int) -> Array:
  """[B, gh, gw, num_classes] float32: 1 where a box of the class contains the cell's centre.

  boxes: [B, N, 4] (cx, cy, w, h) normalized to each image's unpadded `sizes` [B, 2] (h, w);
  cell (i, j) is the cell_size x cell_size square whose top-left pixel is
  (i * cell_size, j * cell_size).
  """
  _, _, inside = _centres_inside(boxes, box_mask, sizes, grid_shape, cell_size)
  hits = jnp.einsum('byxn,bnc->byxc', inside.astype(jnp.float32),
                    jax.nn.one_hot(labels, num_classes))
  return jnp.minimum(hits, 1.0)


def box_edge_targets(boxes: Array, box_mask: Array, sizes: Array, grid_shape: tuple[int, int],
                     cell_size: float) -> tuple[Array, Array]:
  """Where the box around each cell's centre ends: ([B, gh, gw, 4] distances from the centre
  to the left, top, right and bottom edges, normalized like `boxes`; [B, gh, gw] whether a
  box contains the centre). Of several such boxes, the smallest (FCOS's rule); arguments as
  in `box_class_maps`."""
  rows, cols, inside = _centres_inside(boxes, box_mask, sizes, grid_shape, cell_size)
  area = jnp.where(inside, (boxes[..., 2] * boxes[..., 3])[:, None, None], jnp.inf)
  chosen = boxes[jnp.arange(boxes.shape[0])[:, None, None], area.argmin(-1)]  # [B, gh, gw, 4]
  cx, cy, w, h = jnp.moveaxis(chosen, -1, 0)
  y, x = rows[:, :, None], cols[:, None, :]
  edges = jnp.stack([x - (cx - w / 2), y - (cy - h / 2), cx + w / 2 - x, cy + h / 2 - y], -1)
  return edges, inside.any(-1)


def _depth_to_space(x: Array, u: int) -> Array:
  """[B, h, w, u * u * c] -> [B, h * u, w * u, c]: channel block (a, b) to sub-cell (a, b)."""
  b, h, w, channels = x.shape
  x = x.reshape(b, h, w, u, u, channels // (u * u)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * u, w * u, -1)


class DenseHeads(nn.Module):
  """The backbone, and two linear heads on every sub-cell of one of its feature maps: class
  logits (a sigmoid each) and the distances to the edges of the box around the sub-cell.

  Returns (logits [B, h * upsample, w * upsample, num_classes], edges [..., 4], padding mask
  of that grid); the backbone's params live under 'backbone', as in the detector.
  """
  backbone: nn.Module
  num_classes: int
  upsample: int = 4
  feature_level: int = -1

  @nn.compact
  def __call__(self, images: Array, padding_mask: Array, *,
               train: bool) -> tuple[Array, Array, Array]:
    level = self.backbone(images, padding_mask, train=train)[self.feature_level]
    u = self.upsample
    logits = nn.Dense(u * u * self.num_classes, name='head')(level.features)
    # Zero at start, a distance of the right scale: a random head's large errors would
    # drown the class maps' gradient in the first steps.
    edges = nn.Dense(u * u * 4, kernel_init=nn.initializers.zeros, name='edge_head')(
        level.features)
    mask = jnp.repeat(jnp.repeat(level.mask, u, axis=1), u, axis=2)
    return (_depth_to_space(logits.astype(jnp.float32), u),
            _depth_to_space(edges.astype(jnp.float32), u), mask)


def make_step(model: DenseHeads, tx: optax.GradientTransformation, cell_size: float,
              edge_weight: float) -> Callable:
  """(params, opt_state, batch, rng, step) -> (params, opt_state, metrics) over the global
  batch; the step number is folded into rng for dropout and drop path.

  The loss: the class maps' binary cross-entropy, mean over classes and real sub-cells, plus
  `edge_weight` times the L1 distance of the edges, mean over coordinates and the real
  sub-cells inside a box.
  """
  def loss_fn(params, batch, rng):
    logits, edges, mask = model.apply({'params': params}, batch['inputs'],
                                      batch['padding_mask'], train=True, rngs={'dropout': rng})
    grid = logits.shape[1:3]
    targets = box_class_maps(batch['boxes'], batch['labels'], batch['box_mask'], batch['size'],
                             grid, cell_size, model.num_classes)
    target_edges, inside = box_edge_targets(batch['boxes'], batch['box_mask'], batch['size'],
                                            grid, cell_size)
    valid = (~mask).astype(jnp.float32)
    count = jnp.maximum(valid.sum(), 1.0)
    bce = (optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1) * valid).sum() / count
    in_box = valid * inside
    edge_l1 = ((jnp.abs(edges - target_edges).mean(-1) * in_box).sum()
               / jnp.maximum(in_box.sum(), 1.0))
    exact = ((logits > 0) == (targets > 0.5)).all(-1)
    return bce + edge_weight * edge_l1, {'class_bce': bce, 'edge_l1': edge_l1,
                                         'cells_exact': (exact * valid).sum() / count}

  def step(params, opt_state, batch, rng, step_number):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, jax.random.fold_in(rng, step_number))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {'loss': loss, **metrics}

  return step


def checkpoint_path(workdir: str, config: ml_collections.ConfigDict) -> str:
  return os.path.join(os.path.abspath(workdir), SUBDIR, str(config.backbone_pretraining.steps))


def pretrain_backbone(config: ml_collections.ConfigDict, train_ds: DetectionDataset,
                      mesh: jax.sharding.Mesh, workdir: str,
                      writer: metric_writers.MetricWriter) -> str:
  """Runs the phase unless its checkpoint exists; returns the checkpoint's path.

  Reads config.backbone_pretraining (steps, lr, warmup_steps, weight_decay, upsample,
  edge_weight),
  config.model (backbone, dtype, feature_level) and config.rng_seed.
  """
  cfg = config.backbone_pretraining
  path = checkpoint_path(workdir, config)
  manager = ocp.CheckpointManager(os.path.dirname(path),
                                  options=ocp.CheckpointManagerOptions(create=True))
  if cfg.steps in manager.all_steps():
    manager.close()
    logging.info('Backbone pretraining: reusing %s', path)
    return path
  backbone = models.build_backbone(config.model)
  stride = list(base.pyramid_levels(backbone))[config.model.feature_level]
  model = DenseHeads(backbone, train_ds.num_classes, cfg.upsample, config.model.feature_level)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps)
  tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  init_rng, rng = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.rng_seed), 1))
  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  params = jax.jit(lambda key: _init(model, key, train_ds.bucket_shapes[0]),
                   out_shardings=replicated)(init_rng)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  step_fn = jax.jit(make_step(model, tx, stride / cfg.upsample, cfg.edge_weight),
                    in_shardings=(replicated, replicated, batch_sharding, replicated, replicated),
                    out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
  logging.info('Backbone pretraining: %d steps of dense class maps and box edges (weight %g) '
               'at stride %g (%s, feature stride %d)', cfg.steps, cfg.edge_weight,
               stride / cfg.upsample, config.model.backbone, stride)
  params = _run(step_fn, params, opt_state, rng, train_ds, batch_sharding, cfg.steps,
                schedule, config.log_every_steps, writer, mesh)
  manager.save(cfg.steps, args=ocp.args.StandardSave({'params': params}))
  manager.wait_until_finished()
  manager.close()
  logging.info('Backbone pretraining: saved %s', path)
  return path


def _init(model: DenseHeads, key: Array, image_shape: tuple[int, int]) -> Any:
  images = jnp.zeros((1, *image_shape, 3), jnp.float32)
  return model.init(key, images, jnp.zeros(images.shape[:3], bool), train=False)['params']


def _run(step_fn: Callable, params: Any, opt_state: Any, rng: Array,
         train_ds: DetectionDataset, batch_sharding: jax.sharding.Sharding, num_steps: int,
         schedule: Callable, log_every: int, writer: metric_writers.MetricWriter,
         mesh: jax.sharding.Mesh) -> Any:
  """The phase's loop, logging loss, exact-cell fraction, lr, speed and ETA."""
  iterator = iter(train_ds.tf_dataset)
  history, start = [], time.time()
  with jax.set_mesh(mesh):
    for step in range(1, num_steps + 1):
      batch = batching.next_global_batch(iterator, batch_sharding, BATCH_KEYS)
      params, opt_state, metrics = step_fn(params, opt_state, batch, rng, step)
      history.append(metrics)
      if step % log_every == 0 or step == num_steps:
        scalars = steps.mean_metrics(history)
        history = []
        rate = step / (time.time() - start)
        logging.info('Backbone pretraining step %d/%d: loss %.4f (class %.4f, edges %.4f), '
                     'cells exact %.3f, lr %.2e, %.1f steps/s, ETA %.0fs', step, num_steps,
                     scalars['loss'], scalars['class_bce'], scalars['edge_l1'],
                     scalars['cells_exact'], float(schedule(step)), rate,
                     (num_steps - step) / rate)
        writer.write_scalars(step, {f'backbone_pretraining/{k}': v for k, v in scalars.items()})
  return params
