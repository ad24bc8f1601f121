"""Finding and restoring checkpoints: the errors a user meets name what is wrong."""
import os

import numpy as np
import pytest

from qna_detr import models
from qna_detr.data import toy
from qna_detr.train import checkpoints
from qna_detr.train import loop

import train_testing


def test_missing_checkpoints_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'No checkpoint in {tmp_path}/checkpoints'):
    checkpoints.find(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='--checkpoint=/nowhere/5 is not a checkpoint'):
    checkpoints.find(str(tmp_path), '/nowhere/5')


def test_restores_its_own_config_and_refuses_another(tmp_path):
  config = train_testing.micro_config(str(tmp_path / 'data'))
  saved = train_testing.write_random_checkpoint(str(tmp_path), config, step=7)
  step_dir = checkpoints.find(str(tmp_path))
  assert step_dir == os.path.join(tmp_path, 'checkpoints', '7')
  restored = checkpoints.restore_state(
      step_dir, loop.abstract_state(config, models.build_detr(config.model, len(toy.CLASSES))))
  np.testing.assert_array_equal(restored.params['input_proj']['kernel'],
                                saved.params['input_proj']['kernel'])

  other = train_testing.micro_config(str(tmp_path / 'data'))
  other.model.hidden_dim = 48  # Every head parameter changes shape.
  abstract = loop.abstract_state(other, models.build_detr(other.model, len(toy.CLASSES)))
  with pytest.raises(ValueError, match=f'checkpoint {step_dir} does not fit the model of this '
                     'config'):
    checkpoints.restore_state(step_dir, abstract)
  # Resuming the workdir with the other config (what the training loop does) fails the same way.
  resume = checkpoints.Checkpointer(str(tmp_path), keep=1)
  with pytest.raises(ValueError, match='stored \\(32, 32\\), model \\(48, 48\\)'):
    resume.restore(abstract)
  resume.close()


def test_checkpoint_without_the_average_field(tmp_path):
  """A checkpoint written before the train state had `ema_params` (its fields as a dict)
  restores into a config without an average, and is refused by one that wants it."""
  config = train_testing.micro_config(str(tmp_path / 'data'))
  saved = train_testing.write_random_checkpoint(str(tmp_path / 'new'), config, step=3)
  old = {k: getattr(saved, k) for k in ('step', 'params', 'opt_state', 'rng')}
  writer = checkpoints.Checkpointer(str(tmp_path / 'old'), keep=1)
  writer.save(3, old)
  writer.close()
  model = models.build_detr(config.model, len(toy.CLASSES))
  step_dir = str(tmp_path / 'old' / 'checkpoints' / '3')
  restored = checkpoints.restore_state(step_dir, loop.abstract_state(config, model))
  assert restored.ema_params is None
  np.testing.assert_array_equal(restored.params['input_proj']['kernel'],
                                saved.params['input_proj']['kernel'])
  config.ema_decay = 0.9
  with pytest.raises(ValueError, match='does not fit the model of this config'):
    checkpoints.restore_state(step_dir, loop.abstract_state(config, model))
