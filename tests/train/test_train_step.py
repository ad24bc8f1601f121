"""The frozen-backbone train step: head gradients as if the backbone were a constant, and no
backward pass through the backbone."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qna_detr import detectors
from qna_detr import parallel
from qna_detr.detectors.detr.losses import LossWeights, set_criterion
from qna_detr.detectors.matcher import HungarianMatcher
from qna_detr.train import train_step

import train_testing

NUM_CLASSES = 5


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = train_testing.micro_config(str(tmp_path_factory.mktemp('unused')))
  detector = detectors.build(config, NUM_CLASSES)
  rng = np.random.default_rng(0)
  batch = {
      'inputs': jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32),
      'padding_mask': jnp.zeros((2, 64, 64), bool).at[1, :, 48:].set(True),
      'boxes': jnp.asarray([[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]],
                            [[0.5, 0.5, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0]]], jnp.float32),
      'labels': jnp.asarray([[1, 3], [0, 0]], jnp.int32),
      'box_mask': jnp.asarray([[True, True], [True, False]]),
  }
  matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, solver='scipy')
  state = _state(detector, optax.sgd(1.0))
  return detector, batch, matcher, state


def _state(detector, tx, ema=False):
  return train_step.create_state(lambda k: detector.init(k, (64, 64)), tx,
                                 jax.random.PRNGKey(0), ema=ema)


def _run(step, *args):
  """`step` (jitted) called under a one-device mesh (the detector's matcher solves each
  device's images on their own)."""
  with jax.set_mesh(parallel.data_mesh(jax.local_devices()[:1])):
    return step(*args)


def _step(detector, freeze, tx=None, ema_decay=0.0, donate=False):
  """The jitted train step (default: plain SGD at lr 1, so that the update is minus the
  gradient), with the backbone frozen or not, donating the state as training does or not."""
  params = jax.eval_shape(lambda k: detector.init(k, (64, 64)), jax.random.PRNGKey(0))
  frozen = {k: jax.tree.map(lambda _, f=(freeze and k == 'backbone'): f, v)
            for k, v in params.items()}
  return jax.jit(train_step.make_train_step(detector.train_outputs, detector.loss,
                                            tx or optax.sgd(1.0), {}, frozen, ema_decay),
                 donate_argnums=(0,) if donate else ())


def test_frozen_step_moves_the_head_by_its_gradient_and_not_the_backbone(setup):
  detector, batch, matcher, state = setup
  model = detector.module
  new_state, _ = _run(_step(detector, freeze=True), state, batch)

  # Reference: the loss as a function of the head alone, the backbone closed over.
  backbone = state.params['backbone']
  head = {k: v for k, v in state.params.items() if k != 'backbone'}
  rng = jax.random.fold_in(state.rng, state.step)

  def head_loss(head_params):
    outputs = model.apply({'params': {**head_params, 'backbone': backbone}}, batch['inputs'],
                          batch['padding_mask'], train=True, rngs={'dropout': rng})
    targets = {k: batch[k] for k in ('boxes', 'labels', 'box_mask')}
    return set_criterion(outputs, targets, matcher, LossWeights())[0]

  head_grads = jax.grad(head_loss)(head)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(head_grads))
  for name, grads in head_grads.items():
    update = jax.tree.map(lambda new, old: new - old, new_state.params[name], head[name])
    for u, g in zip(jax.tree.leaves(update), jax.tree.leaves(grads), strict=True):
      np.testing.assert_allclose(u, -g, rtol=1e-4, atol=1e-5 * scale)
  assert any(np.abs(g).max() > 1e-6 for g in jax.tree.leaves(head_grads))
  for a, b in zip(jax.tree.leaves(new_state.params['backbone']), jax.tree.leaves(backbone),
                  strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.optimized
def test_frozen_step_skips_the_backbone_backward(setup):
  """XLA's own FLOP count: the backbone's backward costs more than its forward, so dropping
  it must remove well over a third of a full step's work."""
  detector, batch, _, state = setup
  flops = {}
  for freeze in (False, True):
    with jax.set_mesh(parallel.data_mesh(jax.local_devices()[:1])):
      compiled = _step(detector, freeze).lower(state, batch).compile()
    flops[freeze] = compiled.cost_analysis()['flops']
  assert flops[True] < 0.6 * flops[False], flops


def test_moving_average_follows_its_recurrence(setup):
  """Against a numpy recurrence over the parameters the steps produced: after step t (from
  0), avg = d * avg + (1 - d) * params with d = min(decay, (1 + t) / (10 + t))."""
  detector, batch, _, _ = setup
  tx = optax.sgd(0.05)
  state = _state(detector, tx, ema=True)
  step = _step(detector, False, tx, ema_decay=0.5)
  average = jax.tree.map(np.asarray, state.params)
  for t in range(4):
    state, _ = _run(step, state, batch)
    decay = min(0.5, (1 + t) / (10 + t))
    average = jax.tree.map(lambda a, p, d=decay: d * a + (1 - d) * np.asarray(p), average,
                           state.params)
  for got, want, now in zip(jax.tree.leaves(state.eval_params), jax.tree.leaves(average),
                            jax.tree.leaves(state.params), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # The average lags the parameters, so the comparison above is not of the parameters.
  assert any(not np.allclose(a, p) for a, p in zip(jax.tree.leaves(state.eval_params),
                                                   jax.tree.leaves(state.params)))


def test_new_weights_restart_the_average(setup):
  """Pretrained weights replace the parameters and the average alike, as separate buffers:
  the train step donates both (one buffer donated twice is an error)."""
  detector, batch, _, _ = setup
  tx = optax.sgd(0.05)
  state = _state(detector, tx, ema=True)
  loaded = jax.tree.map(lambda p: p + 1.0, state.params)
  state = state.with_params(loaded)
  loaded = jax.tree.map(np.array, loaded)  # Host copies: the step donates the device buffers.
  with jax.set_mesh(parallel.data_mesh(jax.local_devices()[:1])):
    state, _ = _step(detector, False, tx, ema_decay=0.5, donate=True)(state, batch)
  decay = 0.1  # min(0.5, (1 + 0) / (10 + 0)) at the first step.
  for got, start, now in zip(jax.tree.leaves(state.eval_params), jax.tree.leaves(loaded),
                             jax.tree.leaves(state.params), strict=True):
    np.testing.assert_allclose(got, decay * start + (1 - decay) * np.asarray(now),
                               rtol=1e-5, atol=1e-6)
