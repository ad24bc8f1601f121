"""Dense pretraining of the backbone on class maps and box edges drawn from the training boxes.

The paper's DETR fine-tunes an ImageNet-pretrained QnA-ViT. Where no such checkpoint exists
(the synthetic toy set, a new backbone variant), this phase stands in for it: before DETR
trains, the backbone learns, for every sub-cell of the feature map DETR reads, which classes
have a box covering that sub-cell's centre (one sigmoid per class) and how far that box's
edges are (FCOS's regression targets, weighted by `edge_weight`), on the same training split
and input pipeline. Sub-cells finer than the feature stride (`upsample` per side) make the
features say where inside a cell an object's edges fall, which DETR's box regression reads.

A phase of its own (`tools/pretrain_backbone.py`, or before training when
`config.backbone_pretraining.steps > 0`): it checkpoints into WORKDIR/backbone_pretraining
(a killed phase resumes), and its last checkpoint is the `config.pretrained.path` DETR
starts from. A finished phase is reused only by a config with the same settings.
"""
import json
import logging
import os
from typing import Any, Callable

from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from qna_detr import parallel
from qna_detr import workdir as run_files
from qna_detr.backbones import base
from qna_detr.backbones import registry as backbones
from qna_detr.data import batching
from qna_detr.detectors.base import init_params
from qna_detr.train import checkpoints
from qna_detr.train import step_loop
from qna_detr.train import train_step
from qna_detr.train import trainer
from qna_detr.utils import files

logger = logging.getLogger(__name__)

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
  level: int = -1

  @nn.compact
  def __call__(self, images: Array, padding_mask: Array, *,
               train: bool) -> tuple[Array, Array, Array]:
    level = self.backbone(images, padding_mask, train=train)[self.level]
    u = self.upsample
    logits = nn.Dense(u * u * self.num_classes, name='head')(level.features)
    # Zero at start, a distance of the right scale: a random head's large errors would
    # drown the class maps' gradient in the first steps.
    edges = nn.Dense(u * u * 4, kernel_init=nn.initializers.zeros, name='edge_head')(
        level.features)
    mask = jnp.repeat(jnp.repeat(level.mask, u, axis=1), u, axis=2)
    return (_depth_to_space(logits.astype(jnp.float32), u),
            _depth_to_space(edges.astype(jnp.float32), u), mask)


def make_loss(num_classes: int, cell_size: float, edge_weight: float) -> Callable:
  """(outputs, batch) -> (loss, metrics): the class maps' binary cross-entropy, mean over
  classes and real sub-cells, plus `edge_weight` times the L1 distance of the edges, mean over
  coordinates and the real sub-cells inside a box."""
  def loss(outputs, batch):
    logits, edges, mask = outputs
    grid = logits.shape[1:3]
    targets = box_class_maps(batch['boxes'], batch['labels'], batch['box_mask'], batch['size'],
                             grid, cell_size, num_classes)
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
  return loss


def check_config(config: ml_collections.ConfigDict) -> None:
  """The phase's keys, before anything runs; errors name the key."""
  cfg = config.backbone_pretraining
  if cfg.steps > 0 and config.pretrained.path:
    raise ValueError('config.backbone_pretraining.steps > 0 and config.pretrained.path are both '
                     'set: the backbone starts either from a checkpoint or from its own dense '
                     'pretraining; set one.')
  if cfg.steps > 0 and not 0 <= cfg.warmup_steps < cfg.steps:
    raise ValueError(f'config.backbone_pretraining.warmup_steps={cfg.warmup_steps} must be in '
                     f'[0, config.backbone_pretraining.steps={cfg.steps}).')
  for key in ('lr', 'weight_decay'):
    if cfg[key] < 0:
      raise ValueError(f'config.backbone_pretraining.{key}={cfg[key]} must be >= 0.')
  if cfg.upsample < 1:
    raise ValueError(f'config.backbone_pretraining.upsample={cfg.upsample} must be >= 1.')
  levels = len(base.pyramid_levels(backbones.build(config.model)))
  if not -levels <= cfg.level < levels:
    raise ValueError(f'config.backbone_pretraining.level={cfg.level} is not '
                     f'one of the backbone\'s {levels} levels.')
  if cfg.edge_weight < 0:
    raise ValueError(f'config.backbone_pretraining.edge_weight={cfg.edge_weight} must be >= 0 '
                     '(0: class maps only).')


def phase_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), SUBDIR)


def _settings(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """What the phase's result depends on: a finished phase is reused only if these match."""
  return files.as_json({
      'backbone_pretraining': config.backbone_pretraining.to_dict(),
      'model': {k: config.model[k] for k in ('backbone', 'dtype')},
      'dataset': run_files.portable({'dataset': config.dataset.to_dict()}, workdir)['dataset'],
      'batch_size': config.batch_size, 'rng_seed': config.rng_seed})


def _check_settings(directory: str, settings: dict[str, Any]) -> None:
  """Records the settings of a new phase, or refuses a phase made with other settings."""
  path = os.path.join(directory, 'settings.json')
  if os.path.exists(path):
    with open(path) as f:
      files.check_settings(json.load(f), settings, f'The backbone pretraining in {directory}',
                           'delete it to pretrain anew, or use another workdir',
                           prefix='config.')
    return
  os.makedirs(directory, exist_ok=True)
  if jax.process_index() == 0:
    files.write_json(path, settings)


def run(config: ml_collections.ConfigDict, workdir: str,
        writer: metric_writers.MetricWriter) -> str:
  """Runs (or resumes, or reuses) the phase; returns the step directory of its result.

  Reads config.backbone_pretraining (steps, lr, warmup_steps, weight_decay, level,
  upsample, edge_weight), config.model (backbone and its keys, dtype), the training split of
  config.dataset, config.batch_size, rng_seed, log_every_steps, checkpoint_every_steps.
  """
  cfg = config.backbone_pretraining
  directory = phase_dir(workdir)
  _check_settings(directory, _settings(config, workdir))
  checkpointer = checkpoints.Checkpointer(directory, keep=2)
  result = os.path.join(checkpointer.directory, str(cfg.steps))
  if checkpointer.latest_step() == cfg.steps:
    checkpointer.close()
    logger.info('Backbone pretraining: reusing %s', result)
    return result
  train_ds, _ = trainer.build_datasets(config)
  backbone = backbones.build(config.model)
  stride = list(base.pyramid_levels(backbone))[cfg.level]
  model = DenseHeads(backbone, train_ds.num_classes, cfg.upsample, cfg.level)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps)
  tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  mesh = parallel.data_mesh()
  state = jax.jit(lambda key: train_step.create_state(
      lambda k: init_params(model, k, train_ds.bucket_shapes[0]), tx, key),
                  out_shardings=parallel.replicated(mesh))(
                      jax.random.fold_in(jax.random.PRNGKey(config.rng_seed), 1))
  iterator = iter(train_ds.tf_dataset)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state, iterator)
    logger.info('Backbone pretraining: resumed from step %d', int(state.step))
  step_fn = train_step.jit_sharded(train_step.make_train_step(
      train_step.module_forward(model),
      make_loss(train_ds.num_classes, stride / cfg.upsample, cfg.edge_weight), tx,
      {'all': schedule}), mesh)
  logger.info('Backbone pretraining: %d steps of dense class maps and box edges (weight %g) '
              'at stride %g (%s, feature stride %d)', cfg.steps, cfg.edge_weight,
              stride / cfg.upsample, config.model.backbone, stride)
  sharding = parallel.batch_sharding(mesh)
  steps_loop = step_loop.StepLoop(total_steps=cfg.steps, batch_size=config.batch_size,
                                  log_every=config.log_every_steps,
                                  checkpoint_every=config.checkpoint_every_steps,
                                  checkpointer=checkpointer, writer=writer, name=SUBDIR)
  try:
    step_loop.run_steps(step_fn, state,
                        lambda: batching.next_global_batch(iterator, sharding, BATCH_KEYS),
                        iterator, steps_loop, mesh)
  finally:
    checkpointer.close()
  logger.info('Backbone pretraining: saved %s', result)
  return result
