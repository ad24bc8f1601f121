"""AdamW with separate backbone and head learning rates, and DETR's step schedule.

The alternative schedule (config.optimizer.schedule='cosine') decays to zero over the run.

Parameters are split by their top-level key: everything under 'backbone' is the backbone group
(pretrained features, trained 10x slower), the rest is the head. Gradients are clipped by their
global norm over both groups together, as DETR does.
"""
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

BACKBONE, HEAD = 'backbone', 'head'
SCHEDULES = ('step', 'cosine')
Schedule = Callable[[Any], Any]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Optimizer steps in one pass over the training split (a partial last batch counts)."""
  if num_examples < 1 or global_batch_size < 1:
    raise ValueError(f'num_examples ({num_examples}) and global_batch_size '
                     f'({global_batch_size}) must be positive.')
  return math.ceil(num_examples / global_batch_size)


def step_schedule(base_lr: float, epoch_steps: int, decay_epochs: Sequence[int],
                  decay_factor: float, warmup_steps: int = 0) -> Schedule:
  """base_lr, multiplied by decay_factor after each epoch in decay_epochs.

  An optional linear warmup ramps it from 0 over the first warmup_steps; the decay boundaries
  stay at their absolute epochs.
  """
  boundaries = {int(e * epoch_steps): decay_factor for e in decay_epochs}
  steps = optax.piecewise_constant_schedule(base_lr, boundaries)
  if warmup_steps <= 0:
    return steps
  return lambda step: steps(step) * jnp.minimum(1.0, step / warmup_steps)


def param_labels(params: Any) -> Any:
  """The group of every parameter leaf: 'backbone' under the top-level 'backbone' key."""
  def label(path, _):
    return BACKBONE if getattr(path[0], 'key', None) == BACKBONE else HEAD
  return jax.tree_util.tree_map_with_path(label, params)


def build_optimizer(config: ml_collections.ConfigDict, epoch_steps: int, total_steps: int
                    ) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
  """The optimizer and the learning-rate schedule of each group (for logging).

  Reads config.optimizer: lr, backbone_lr, weight_decay, grad_clip_norm, schedule ('step':
  decay_epochs and decay_factor; 'cosine'), warmup_steps, freeze_backbone.
  """
  opt = config.optimizer
  if opt.schedule not in SCHEDULES:
    raise ValueError(f'config.optimizer.schedule must be one of {SCHEDULES}, got '
                     f'{opt.schedule!r}')

  def schedule(lr):
    if opt.schedule == 'cosine':  # The same linear warmup (none at 0), then down to zero.
      return optax.warmup_cosine_decay_schedule(0.0, lr, opt.warmup_steps, total_steps)
    return step_schedule(lr, epoch_steps, opt.decay_epochs, opt.decay_factor, opt.warmup_steps)

  schedules = {group: schedule(lr) for group, lr in ((HEAD, opt.lr), (BACKBONE, opt.backbone_lr))}
  if opt.freeze_backbone:
    schedules[BACKBONE] = optax.constant_schedule(0.0)
  transforms = {group: optax.adamw(schedule, weight_decay=opt.weight_decay)
                for group, schedule in schedules.items()}
  if opt.freeze_backbone:
    transforms[BACKBONE] = optax.set_to_zero()
  tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm),
                   optax.multi_transform(transforms, param_labels))
  return tx, schedules
