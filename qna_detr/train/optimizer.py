"""AdamW with separate backbone and head learning rates, and DETR's step schedule.

The step schedule multiplies both rates by `decay_factor` after each epoch of `decay_epochs`;
left at None, after `decay_fraction` of the run, whatever its length (DETR's 75-epoch recipe:
after 2/3, epoch 50), so that `--config.num_epochs` moves the decay with it. The alternative
schedule (config.optimizer.schedule='cosine') decays to zero over the run.

Parameters are split by their top-level key: everything under 'backbone' is the backbone group
(pretrained features, trained 10x slower), the rest is the head. Frozen parameters (the whole
backbone with `freeze_backbone`, and those the detector keeps fixed) form a third group that
the optimizer leaves unchanged. Gradients are clipped by their global norm over all groups
together, as DETR does.
"""
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

BACKBONE, HEAD, FROZEN = 'backbone', 'head', 'frozen'
SCHEDULES = ('step', 'cosine')
Schedule = Callable[[Any], Any]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Optimizer steps in one pass over the training split (a partial last batch counts)."""
  if num_examples < 1 or global_batch_size < 1:
    raise ValueError(f'num_examples ({num_examples}) and global_batch_size '
                     f'({global_batch_size}) must be positive.')
  return math.ceil(num_examples / global_batch_size)


def decay_steps(config: ml_collections.ConfigDict, epoch_steps: int,
                total_steps: int) -> list[int]:
  """The steps after which the step schedule decays: `decay_epochs` (epochs), or where None
  after `decay_fraction` of `total_steps`; a decay outside the run is refused naming both
  keys."""
  opt = config.optimizer
  if opt.decay_epochs is None:
    return [int(round(opt.decay_fraction * total_steps))]
  steps = [int(e * epoch_steps) for e in opt.decay_epochs]
  outside = [e for e, s in zip(opt.decay_epochs, steps) if not 0 < s < total_steps]
  if outside:
    raise ValueError(f'config.optimizer.decay_epochs={tuple(opt.decay_epochs)}: epoch(s) '
                     f'{outside} lie outside the run of {total_steps} steps '
                     f'({total_steps / epoch_steps:.4g} epochs, config.num_epochs / '
                     'config.num_train_steps); None decays after '
                     'config.optimizer.decay_fraction of the run.')
  return steps


def step_schedule(base_lr: float, boundaries: Sequence[int], decay_factor: float,
                  warmup_steps: int = 0) -> Schedule:
  """base_lr, multiplied by decay_factor after each step in `boundaries`.

  An optional linear warmup ramps it from 0 over the first warmup_steps; the decay boundaries
  stay where they are.
  """
  steps = optax.piecewise_constant_schedule(base_lr, {int(b): decay_factor for b in boundaries})
  if warmup_steps <= 0:
    return steps
  return lambda step: steps(step) * jnp.minimum(1.0, step / warmup_steps)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def frozen_mask(params: Any, config: ml_collections.ConfigDict,
                frozen: Callable[[tuple[str, ...]], bool] = lambda path: False) -> Any:
  """A tree of bools like `params`: True for the parameters that stay fixed (all of the
  backbone with `config.optimizer.freeze_backbone`, and those `frozen(path)` names)."""
  freeze_backbone = config.optimizer.freeze_backbone

  def is_frozen(path, _):
    names = _path_names(path)
    return bool((freeze_backbone and names[0] == BACKBONE) or frozen(names))
  return jax.tree_util.tree_map_with_path(is_frozen, params)


def param_labels(params: Any, mask: Any = None) -> Any:
  """The group of every parameter leaf: 'frozen' where `mask` says so, else 'backbone' under
  the top-level 'backbone' key and 'head' elsewhere."""
  mask = jax.tree.map(lambda _: False, params) if mask is None else mask

  def label(path, _, is_frozen):
    if is_frozen:
      return FROZEN
    return BACKBONE if _path_names(path)[0] == BACKBONE else HEAD
  return jax.tree_util.tree_map_with_path(label, params, mask)


def build_optimizer(config: ml_collections.ConfigDict, epoch_steps: int, total_steps: int,
                    mask: Any = None
                    ) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
  """The optimizer and the learning-rate schedule of each group (for logging).

  Reads config.optimizer: lr, backbone_lr, weight_decay, grad_clip_norm, schedule ('step':
  decay_epochs or decay_fraction, decay_factor; 'cosine'), warmup_steps, freeze_backbone. `mask` is the
  `frozen_mask` of the parameters (None: nothing frozen but what freeze_backbone says, which
  then must be applied through the labels alone).
  """
  opt = config.optimizer
  if opt.schedule not in SCHEDULES:
    raise ValueError(f'config.optimizer.schedule must be one of {SCHEDULES}, got '
                     f'{opt.schedule!r}')

  boundaries = decay_steps(config, epoch_steps, total_steps) if opt.schedule == 'step' else []

  def schedule(lr):
    if opt.schedule == 'cosine':  # The same linear warmup (none at 0), then down to zero.
      return optax.warmup_cosine_decay_schedule(0.0, lr, opt.warmup_steps, total_steps)
    return step_schedule(lr, boundaries, opt.decay_factor, opt.warmup_steps)

  schedules = {group: schedule(lr) for group, lr in ((HEAD, opt.lr), (BACKBONE, opt.backbone_lr))}
  if opt.freeze_backbone:
    schedules[BACKBONE] = optax.constant_schedule(0.0)
  transforms = {group: optax.adamw(schedule, weight_decay=opt.weight_decay)
                for group, schedule in schedules.items()}
  transforms[FROZEN] = optax.set_to_zero()

  def labels(params):
    return param_labels(params, frozen_mask(params, config) if mask is None else mask)

  tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm),
                   optax.multi_transform(transforms, labels))
  return tx, schedules
