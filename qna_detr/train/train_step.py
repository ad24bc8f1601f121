"""The train state and the jitted train step: forward, loss, AdamW update, moving average;
and both as a config asks for them (`initial_state`, `abstract_state`, `jit_step`).

Free of TensorFlow and CLU, so that benchmarks run where only JAX is installed.
"""
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from qna_detr import parallel
from qna_detr.detectors.base import DetectorDef, Loss
from qna_detr.train import optimizer


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


def create_state(init: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 rng: jax.Array, ema: bool = False) -> TrainState:
  """The initial state: parameters from `init(key)`, the optimizer's state, the step's key."""
  init_rng, train_rng = jax.random.split(rng)
  params = init(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=train_rng, ema_params=params if ema else None)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """decay, lowered to (1 + step) / (10 + step) early on: an average that started at the
  initial parameters would otherwise hold on to them for ~1 / (1 - decay) steps."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


# (params, batch, step key) -> the model's outputs in training mode.
Forward = Callable[[Any, dict[str, jax.Array], jax.Array], Any]


def module_forward(module: flax.linen.Module) -> Forward:
  """The `Forward` of a module called as `module(images, padding_mask, train=True)`, its
  dropout drawn from the step key."""
  def forward(params, batch, rng):
    return module.apply({'params': params}, batch['inputs'], batch['padding_mask'],
                        train=True, rngs={'dropout': rng})
  return forward


def make_train_step(forward: Forward, loss: Loss, tx: optax.GradientTransformation,
                    schedules: dict[str, Callable], frozen: Any = None,
                    ema_decay: float = 0.0) -> Callable:
  """(state, batch) -> (state, metrics) over the global batch; jit it with shardings.

  `forward` computes the outputs that `loss` scores, from the step's key (the state's key
  folded with its step number, so that a resumed run draws what an uninterrupted one does).

  `frozen` (a tree of bools like the parameters, or None) marks parameters that are constants
  of the loss: no backward pass runs into them (a frozen backbone costs its forward pass
  only), their gradients are zeros and the optimizer must leave them alone. A state with
  `ema_params` moves them towards the new parameters by 1 - `ema_decay_at`.
  """
  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      if frozen is not None:
        params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
      return loss(forward(params, batch, rng), batch)

    (value, components), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {'loss': value, **components, 'grad_norm': optax.global_norm(grads),
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


def initial_state(config: ml_collections.ConfigDict, detector: DetectorDef, tx, key: jax.Array,
                  image_shape: Sequence[int]) -> TrainState:
  """The initial train state of this config (with a moving average if it keeps one)."""
  return create_state(lambda k: detector.init(k, image_shape), tx, key,
                      ema=config.ema_decay > 0)


def frozen_mask(config: ml_collections.ConfigDict, detector: DetectorDef) -> Any:
  """Which parameters stay fixed: the frozen backbone and what the detector keeps fixed."""
  return optimizer.frozen_mask(detector.abstract_params(), config, detector.frozen)


def abstract_state(config: ml_collections.ConfigDict, detector: DetectorDef) -> TrainState:
  """The train state's shapes and dtypes, computed without running: what a checkpoint of
  this config restores into."""
  # The schedule's numbers do not change the state's structure; any run length will do.
  tx, _ = optimizer.build_optimizer(config, epoch_steps=1, total_steps=2**31 - 1,
                                    mask=frozen_mask(config, detector))
  return jax.eval_shape(lambda key: initial_state(config, detector, tx, key, (64, 64)),
                        jax.random.PRNGKey(0))


def jit_sharded(step: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """A (state, batch) -> (state, metrics) step jitted for a replicated state and a batch split
  over `mesh`, the state donated."""
  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def jit_step(config: ml_collections.ConfigDict, detector: DetectorDef, tx, schedules,
             mask: Any, mesh: jax.sharding.Mesh):
  """The detector's train step, jitted for a replicated state and a batch split over `mesh`."""
  return jit_sharded(make_train_step(detector.train_outputs, detector.loss, tx, schedules, mask,
                                     config.ema_decay), mesh)
