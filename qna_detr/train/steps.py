"""The jitted training step: forward, Hungarian matching, set loss, AdamW update."""
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qna_detr.detr import LossWeights, set_criterion
from qna_detr.train.optimizer import BACKBONE

TARGET_KEYS = ('boxes', 'labels', 'box_mask')
BATCH_KEYS = ('inputs', 'padding_mask') + TARGET_KEYS  # All a train step reads.


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # Base key; each step folds its number in for dropout and drop path.
  ema_params: Any = None  # The parameters' moving average, when the config keeps one.

  def with_params(self, params: Any) -> 'TrainState':
    """The state with new parameters (pretrained weights), its average restarted from them
    (a copy: the train step donates both)."""
    average = None if self.ema_params is None else jax.tree.map(jnp.copy, params)
    return self.replace(params=params, ema_params=average)

  @property
  def eval_params(self) -> Any:
    """What evaluation and export read: the moving average when there is one."""
    return self.params if self.ema_params is None else self.ema_params


def create_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                 image_shape: tuple[int, int], ema: bool = False) -> TrainState:
  init_rng, train_rng = jax.random.split(rng)
  images = jnp.zeros((1, *image_shape, 3), jnp.float32)
  params = model.init(init_rng, images, jnp.zeros(images.shape[:3], bool), train=False)['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=train_rng, ema_params=params if ema else None)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """decay, lowered to (1 + step) / (10 + step) early on: an average that started at the
  initial parameters would otherwise hold on to them for ~1 / (1 - decay) steps."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, matcher: Callable,
                    weights: LossWeights, schedules: dict[str, Callable],
                    freeze_backbone: bool = False, ema_decay: float = 0.0) -> Callable:
  """(state, batch) -> (state, metrics) over the global batch; jit it with shardings.

  With freeze_backbone the backbone's parameters are constants of the loss, so no backward
  pass runs through the backbone (its gradients are zeros and its optimizer ignores them).
  A state with `ema_params` moves them towards the new parameters by 1 - `ema_decay_at`.
  """
  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    targets = {k: batch[k] for k in TARGET_KEYS}

    def loss_fn(params):
      if freeze_backbone:
        params = {**params, BACKBONE: jax.lax.stop_gradient(params[BACKBONE])}
      outputs = model.apply({'params': params}, batch['inputs'], batch['padding_mask'],
                            train=True, rngs={'dropout': rng})
      return set_criterion(outputs, targets, matcher, weights)

    (loss, components), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {'loss': loss, **components, 'grad_norm': optax.global_norm(grads),
               **{f'lr_{group}': schedule(state.step) for group, schedule in schedules.items()}}
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = optax.incremental_update(params, ema_params,
                                            1.0 - ema_decay_at(ema_decay, state.step))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, metrics

  return train_step


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Host means of the metrics of several steps (one device transfer for all of them)."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
  return {k: float(np.mean(v)) for k, v in stacked.items()}
