"""Learning-rate groups and the 75-epoch schedule, checked against hand-computed values."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from qna_detr import recipes
from qna_detr.train import config_checks
from qna_detr.train import optimizer


def _config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      lr=1e-4, backbone_lr=1e-5, weight_decay=1e-4, grad_clip_norm=0.1, schedule='step',
      decay_epochs=None, decay_fraction=2 / 3, decay_factor=0.1, warmup_steps=0,
      freeze_backbone=False))
  cfg.update(overrides)
  return ml_collections.ConfigDict({'optimizer': cfg})


def _params():
  # Zero parameters: AdamW's decoupled weight decay adds nothing on the first step.
  return {'backbone': {'stem': {'kernel': jnp.zeros((3, 4))}},
          'input_proj': {'kernel': jnp.zeros((4, 2)), 'bias': jnp.zeros((2,))},
          'class_embed': {'kernel': jnp.zeros((2, 5))}}


def _grads(params, seed=0):
  """Random signs and magnitudes well above Adam's epsilon."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(
      rng.choice([-1.0, 1.0], p.shape) * rng.uniform(0.5, 2.0, p.shape)), params)


@pytest.mark.parametrize('freeze', [False, True])
def test_each_group_moves_by_its_own_learning_rate(freeze):
  """Adam's first step is lr * g / (|g| + eps) = lr * sign(g), whatever clipping did to g."""
  tx, _ = optimizer.build_optimizer(_config(freeze_backbone=freeze), epoch_steps=10,
                                    total_steps=100)
  params = _params()
  grads = _grads(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  backbone_step = np.abs(updates['backbone']['stem']['kernel'])
  np.testing.assert_allclose(backbone_step, 0.0 if freeze else 1e-5, rtol=1e-4)
  for name in ('input_proj', 'class_embed'):
    for leaf in updates[name].values():
      np.testing.assert_allclose(np.abs(leaf), 1e-4, rtol=1e-4)
  # Updates oppose the gradient.
  kernel = 'class_embed', 'kernel'
  assert np.all(np.sign(updates[kernel[0]][kernel[1]]) == -np.sign(grads[kernel[0]][kernel[1]]))


@pytest.mark.parametrize('decay_epochs', [None, (50,)])
def test_schedule_drops_tenfold_after_epoch_50(decay_epochs):
  """Explicitly, or by the recipe's rule: after 2/3 of the 75 epochs."""
  epoch_steps = optimizer.steps_per_epoch(num_examples=118_287, global_batch_size=32)
  assert epoch_steps == 3697  # ceil(118287 / 32)
  _, schedules = optimizer.build_optimizer(_config(decay_epochs=decay_epochs), epoch_steps,
                                           75 * epoch_steps)
  drop = 50 * epoch_steps
  for group, lr in (('head', 1e-4), ('backbone', 1e-5)):
    values = [float(schedules[group](s)) for s in (0, drop - 1, drop, drop + 1, 75 * epoch_steps)]
    np.testing.assert_allclose(values, [lr, lr, lr / 10, lr / 10, lr / 10], rtol=1e-6)


def test_warmup_is_linear_then_joins_the_steps():
  schedule = optimizer.step_schedule(1e-4, boundaries=[200], decay_factor=0.1,
                                     warmup_steps=10)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10, 199, 200)],
                             [0.0, 5e-5, 1e-4, 1e-4, 1e-5], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('warmup', [0, 10])
def test_cosine_falls_from_each_groups_lr_to_zero(warmup):
  """Hand values: a linear ramp over the warmup w, then base * (1 + cos(pi * t)) / 2 with t
  going from 0 at the warmup's end to 1 at the last step."""
  _, schedules = optimizer.build_optimizer(_config(schedule='cosine', warmup_steps=warmup),
                                           epoch_steps=10, total_steps=100)
  for group, lr in (('head', 1e-4), ('backbone', 1e-5)):
    def expected(s):
      if s < warmup:
        return lr * s / warmup
      return lr * (1 + np.cos(np.pi * (s - warmup) / (100 - warmup))) / 2
    steps = (0, 5, warmup, 50, 75, 100)
    np.testing.assert_allclose([float(schedules[group](s)) for s in steps],
                               [expected(s) for s in steps], rtol=1e-5, atol=1e-12)


def test_unknown_schedule_is_named():
  with pytest.raises(ValueError, match='config.optimizer.schedule'):
    optimizer.build_optimizer(_config(schedule='linear'), epoch_steps=10, total_steps=100)


def test_bad_sizes_are_named():
  with pytest.raises(ValueError, match='global_batch_size'):
    optimizer.steps_per_epoch(100, 0)


@pytest.mark.parametrize('recipe,epochs,decay_epoch', [
    (recipes.detr_resnet50_coco, 24, 16),  # 2/3 of the run, as 50 of the paper's 75.
    (recipes.detr_resnet50_coco, 150, 100),
    (recipes.toy, 24, 19.68),  # The toy's last 18%.
])
def test_the_decay_follows_num_epochs(recipe, epochs, decay_epoch):
  """--config.num_epochs on a recipe: the decay moves where the recipe's rule puts it."""
  config = recipe()
  config.num_epochs = epochs
  config = config_checks.check_config(config)
  epoch_steps = 100
  steps = optimizer.decay_steps(config, epoch_steps, epochs * epoch_steps)
  assert steps == [round(decay_epoch * epoch_steps)]


def test_a_decay_outside_the_run_is_refused_naming_both_keys():
  config = recipes.detr_resnet50_coco()
  config.num_epochs = 12
  config.optimizer.decay_epochs = (11, 30)
  with pytest.raises(ValueError, match=r'config.optimizer.decay_epochs=\(11, 30\).*'
                                       r'config.num_epochs=12'):
    config_checks.check_config(config)
  config.num_train_steps = 500  # A run counted in steps: refused once its epochs are known.
  with pytest.raises(ValueError, match=r'epoch\(s\) \[11, 30\] lie outside the run of 500 steps '
                                       r'\(5 epochs.*config.num_train_steps'):
    optimizer.build_optimizer(config_checks.check_config(config), 100, 500)


def test_an_evaluation_beyond_the_run_is_refused():
  config = recipes.detr_resnet50_coco()
  config.num_epochs = 4
  with pytest.raises(ValueError, match=r'config.eval_every_epochs=5.0 must be in \(0, '
                                       r'config.num_epochs=4\] \(None: evaluate at the end'):
    config_checks.check_config(config)
