"""Registration in Scenic's dataset registry, against a stand-in for Scenic's interface."""

import dataclasses
import importlib
import itertools
import sys
import types

import jax
import numpy as np
import pytest

import qna_detr.data.scenic_dataset


class _Registry:
  """Scenic's `DatasetRegistry` interface (add raises on a duplicate name)."""
  _REGISTRY = {}

  @classmethod
  def add(cls, name, builder_fn):
    if name in cls._REGISTRY:
      raise KeyError(name)
    cls._REGISTRY[name] = builder_fn

  @classmethod
  def list(cls):
    return list(cls._REGISTRY)


@dataclasses.dataclass(frozen=True)
class _Dataset:
  """Scenic's `dataset_utils.Dataset` fields that the builder fills."""
  train_iter: object = None
  valid_iter: object = None
  test_iter: object = None
  meta_data: dict = dataclasses.field(default_factory=dict)


@pytest.fixture
def fake_scenic(monkeypatch):
  scenic = types.ModuleType('scenic')
  dataset_lib = types.ModuleType('scenic.dataset_lib')
  datasets = types.ModuleType('scenic.dataset_lib.datasets')
  dataset_utils = types.ModuleType('scenic.dataset_lib.dataset_utils')
  datasets.DatasetRegistry = type('DatasetRegistry', (_Registry,), {'_REGISTRY': {}})
  dataset_utils.Dataset = _Dataset
  scenic.dataset_lib = dataset_lib
  dataset_lib.datasets, dataset_lib.dataset_utils = datasets, dataset_utils
  for name, module in [('scenic', scenic), ('scenic.dataset_lib', dataset_lib),
                       ('scenic.dataset_lib.datasets', datasets),
                       ('scenic.dataset_lib.dataset_utils', dataset_utils)]:
    monkeypatch.setitem(sys.modules, name, module)
  yield importlib.reload(qna_detr.data.scenic_dataset), datasets.DatasetRegistry
  monkeypatch.undo()
  importlib.reload(qna_detr.data.scenic_dataset)


def test_without_scenic_nothing_registers(monkeypatch):
  """Scenic absent (or disabled, where it is importable): nothing to register with."""
  monkeypatch.setenv('QNA_DETR_DISABLE_SCENIC', '1')
  try:
    module = importlib.reload(qna_detr.data.scenic_dataset)
    assert module.datasets is None and not module.available()
    assert module.register() is False
  finally:
    monkeypatch.undo()
    importlib.reload(qna_detr.data.scenic_dataset)


def test_registered_builder_returns_sharded_iterators(fake_scenic, toy_config):
  module, registry = fake_scenic
  assert module.register() is True  # Registered on import; a second call changes nothing.
  builder = registry._REGISTRY[module.DATASET_NAME]
  dataset = builder(batch_size=4, eval_batch_size=4, num_shards=2, dtype_str='bfloat16',
                    shuffle_seed=0, rng=None,
                    dataset_configs={**toy_config.dataset, 'batch_layout': 'qna_detr'},
                    dataset_service_address=None)
  batch = next(dataset.train_iter)
  assert batch['inputs'].shape[:2] == (2, 2) and batch['inputs'].dtype.name == 'bfloat16'
  assert batch['inputs'].shape[2:4] in dataset.meta_data['bucket_shapes']
  assert batch['boxes'].shape == (2, 2, 100, 4)
  meta = dataset.meta_data
  assert meta['num_classes'] == 5 and meta['num_train_examples'] == 24
  steps = -(-meta['num_eval_examples'] // 4)  # Scenic's steps per eval.
  one_pass = list(itertools.islice(dataset.valid_iter, steps))
  ids = [i for b in one_pass for i in b['image_id'][b['valid']]]
  assert sorted(ids) == sorted(im['id'] for im in meta['coco_ground_truth']()['images'])
  next_pass = next(dataset.valid_iter)
  np.testing.assert_array_equal(next_pass['image_id'], one_pass[0]['image_id'])


def _first_ids(builder, toy_config, **seeds):
  dataset = builder(batch_size=4, eval_batch_size=4, num_shards=1, dataset_configs=dict(
      toy_config.dataset), **seeds)
  return next(dataset.train_iter)['label']['image/id'].ravel().tolist()


def test_scenic_layout_and_seeds(fake_scenic, toy_config):
  """Scenic's detection layout (padding class 0, masks of ones); the order follows
  shuffle_seed, or the rng where the seed is None (Scenic's default)."""
  module, registry = fake_scenic
  builder = registry._REGISTRY[module.DATASET_NAME]
  dataset = builder(batch_size=4, eval_batch_size=4, num_shards=2, shuffle_seed=None,
                    rng=jax.random.PRNGKey(0), dataset_configs=dict(toy_config.dataset))
  batch = next(dataset.train_iter)
  assert dataset.meta_data['num_classes'] == 6  # Five classes and the padding class 0.
  assert set(batch) == {'inputs', 'padding_mask', 'batch_mask', 'label'}
  label = batch['label']
  assert batch['padding_mask'].dtype == np.float32 and batch['padding_mask'].max() == 1.0
  assert (batch['batch_mask'] == 1.0).all()
  real = label['labels'] > 0
  assert real.any() and (label['labels'] <= 5).all()
  assert (label['boxes'][~real] == 0).all() and (label['boxes'][real] > 0).any()
  val = next(dataset.valid_iter)
  assert set(val['batch_mask'].ravel().tolist()) <= {0.0, 1.0}

  same = _first_ids(builder, toy_config, shuffle_seed=3, rng=None)
  assert same == _first_ids(builder, toy_config, shuffle_seed=3, rng=None)
  key = jax.random.PRNGKey(5)
  by_rng = _first_ids(builder, toy_config, shuffle_seed=None, rng=key)
  assert by_rng == _first_ids(builder, toy_config, shuffle_seed=None, rng=key)
  other = _first_ids(builder, toy_config, shuffle_seed=None, rng=jax.random.PRNGKey(6))
  assert other != by_rng  # Another key, another order (by chance the same: 1 in 255,024).
