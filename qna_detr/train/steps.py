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


def create_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                 image_shape: tuple[int, int]) -> TrainState:
  init_rng, train_rng = jax.random.split(rng)
  images = jnp.zeros((1, *image_shape, 3), jnp.float32)
  params = model.init(init_rng, images, jnp.zeros(images.shape[:3], bool), train=False)['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=train_rng)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, matcher: Callable,
                    weights: LossWeights, schedules: dict[str, Callable],
                    freeze_backbone: bool = False) -> Callable:
  """(state, batch) -> (state, metrics) over the global batch; jit it with shardings.

  With freeze_backbone the backbone's parameters are constants of the loss, so no backward
  pass runs through the backbone (its gradients are zeros and its optimizer ignores them).
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
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Host means of the metrics of several steps (one device transfer for all of them)."""
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *history))
  return {k: float(np.mean(v)) for k, v in stacked.items()}
