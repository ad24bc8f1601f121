"""The training loop: exact resume, bad configs named, the final metrics file."""
import json

from clu import metric_writers
import jax
import numpy as np
import pytest

from qna_detr import detectors
from qna_detr.backbones import weights
from qna_detr.train import trainer
from qna_detr.train import phases
from qna_detr.utils import checkpoint_io
import train_testing


def _run(config, workdir):
  writer = metric_writers.LoggingWriter()
  return phases.run(jax.random.PRNGKey(0), config, str(workdir), writer)


def _params_at(workdir, step):
  """The parameters and their moving average stored by the checkpoint of `step`."""
  stored = checkpoint_io.read_tree(str(workdir / 'checkpoints' / str(step)))
  return {'params': stored['params'], 'ema_params': stored['ema_params']}


@pytest.mark.slow  # End to end.
@pytest.mark.parametrize('cached_features', [False, True])
def test_resumed_run_equals_uninterrupted_run(tmp_path, cached_features):
  data = str(tmp_path / 'data')
  config = train_testing.micro_config(data, steps=4)
  config.ema_decay = 0.9  # The average is part of the state that must resume.
  # The cache's batches follow from the step number instead of a checkpointed iterator.
  config.optimizer.freeze_backbone = cached_features
  config.train_input = 'cached_features' if cached_features else 'images'
  if cached_features:  # A frozen backbone needs weights: random ones, from a checkpoint.
    train_testing.write_random_checkpoint(str(tmp_path / 'weights'), config)
    config.pretrained.path = str(tmp_path / 'weights' / 'checkpoints' / '1')
  metrics = _run(config, tmp_path / 'straight')
  assert set(metrics) == {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                          'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl'}
  written = json.loads((tmp_path / 'straight' / 'metrics.json').read_text())
  # pycocotools' -1 for APl and ARl (the micro set has no large objects), and a note saying so.
  assert metrics['APl'] == -1 and 'APl' in written.pop('note')
  assert written == pytest.approx(metrics)

  half = train_testing.micro_config(data, steps=2)
  half.ema_decay = config.ema_decay
  half.optimizer.freeze_backbone = cached_features
  half.pretrained.path = config.pretrained.path
  half.train_input = config.train_input
  _run(half, tmp_path / 'resumed')  # Stops after step 2 (checkpointed).
  _run(config, tmp_path / 'resumed')  # Picks up at step 2, runs to 4.
  straight = jax.tree.leaves(_params_at(tmp_path / 'straight', 4))
  resumed = jax.tree.leaves(_params_at(tmp_path / 'resumed', 4))
  for a, b in zip(straight, resumed, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Steps 3 and 4 changed the parameters, so the equality above says something.
  at_two = jax.tree.leaves(_params_at(tmp_path / 'straight', 2))
  assert any(not np.allclose(a, b) for a, b in zip(at_two, straight))


@pytest.mark.parametrize('key,value,message', [
    ('model.backbone', 'qna_vit_huge', 'config.model.backbone'),
    ('model.dtype', 'float8', 'config.model.dtype'),
    ('eval_top_k', 50, 'config.eval_top_k'),
    ('ema_decay', 1.0, 'config.ema_decay'),
    ('train_input', 'cached_features', 'config.optimizer.freeze_backbone'),
    ('optimizer.freeze_backbone', True, 'config.backbone_pretraining.steps'),
    ('train_input', 'videos', 'config.train_input'),
    ('model.name', 'yolo', 'config.model.name'),
    ('model.qna_implementation', 'cuda', 'config.model.qna_implementation'),
    ('optimizer.lr', -1e-4, 'config.optimizer.lr'),
    ('optimizer.weight_decay', -1.0, 'config.optimizer.weight_decay'),
    ('checkpoint_every_steps', 0, 'config.checkpoint_every_steps'),
    ('log_every_steps', 0, 'config.log_every_steps'),
    ('model.num_queries', 4, 'config.dataset.max_boxes=8'),
    ('backbone_pretraining.lr', -1.0, 'config.backbone_pretraining.lr'),
])
def test_bad_config_names_the_key(tmp_path, key, value, message):
  config = train_testing.micro_config(str(tmp_path / 'data'))
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    trainer.build_datasets(phases.prepare(config, str(tmp_path)))


def test_missing_dataset_is_named(tmp_path):
  config = train_testing.micro_config(str(tmp_path / 'data'))
  del config['toy_data']
  config.dataset.train_json = str(tmp_path / 'nowhere' / 'instances_train.json')
  config.dataset.train_images = str(tmp_path / 'nowhere')
  with pytest.raises((ValueError, FileNotFoundError), match='instances_train.json'):
    trainer.build_datasets(phases.prepare(config, str(tmp_path)))


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  config = train_testing.micro_config(str(tmp_path / 'data'))
  (tmp_path / 'taken').write_text('')
  with pytest.raises(NotADirectoryError, match=f'--workdir={tmp_path}/taken is a file'):
    phases.prepare(config, str(tmp_path / 'taken'))


def test_the_toy_config_reads_a_coco_folder_of_ones_own(tmp_path, real_folder, caplog):
  """Explicit config.dataset paths switch the toy set off (logged); nothing is made."""
  json_path, images = real_folder
  config = train_testing.micro_config(str(tmp_path / 'toy'))
  config.dataset.update(train_json=json_path, train_images=images, val_json=json_path,
                        val_images=images)
  with caplog.at_level('INFO', logger='qna_detr'):
    prepared = phases.prepare(config, str(tmp_path / 'run'))
  assert (prepared.dataset.train_json, prepared.dataset.val_images) == (json_path, images)
  assert not (tmp_path / 'toy').exists()
  assert 'not the toy set' in caplog.text
  train_ds, _ = trainer.build_datasets(prepared)
  assert (train_ds.num_examples, train_ds.category_ids) == (2, (44, 64))


def test_another_variants_weights_are_refused_unless_partial(tmp_path, caplog):
  """QnA-ViT-T's weights into QnA-ViT-S (the same widths, more blocks), and back."""
  tiny = train_testing.micro_config('unused')
  tiny.model.backbone = 'qna_vit_tiny'
  train_testing.write_random_checkpoint(str(tmp_path / 'weights'), tiny)
  other = train_testing.micro_config('unused')
  other.model.backbone = 'qna_vit_small'
  other.pretrained.path = str(tmp_path / 'weights' / 'checkpoints' / '1')
  params = detectors.build(other, 5).abstract_params()
  with pytest.raises(ValueError, match=r"does not fit the backbone config.model.backbone="
                                       r"'qna_vit_small': \d+ matched, 144 missing "
                                       r"\[stage3_qna3.*0 unexpected .*allow_partial"):
    weights.load_pretrained_backbone(params, other)
  train_testing.write_random_checkpoint(str(tmp_path / 'small'), other)
  tiny.pretrained.path = str(tmp_path / 'small' / 'checkpoints' / '1')
  with pytest.raises(ValueError, match=r'0 missing \[\], 144 unexpected'):
    weights.load_pretrained_backbone(detectors.build(tiny, 5).abstract_params(), tiny)
  other.pretrained.allow_partial = True
  with caplog.at_level('WARNING', logger='qna_detr'):
    loaded = weights.load_pretrained_backbone(params, other)
  assert 'Partial pretrained load' in caplog.text
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
