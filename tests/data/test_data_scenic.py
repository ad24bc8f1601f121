"""Registration in Scenic's dataset registry, against a stand-in for Scenic's interface."""

import dataclasses
import importlib
import itertools
import sys
import types

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


def test_without_scenic_nothing_registers():
  assert qna_detr.data.scenic_dataset.datasets is None
  assert qna_detr.data.scenic_dataset.register() is False


def test_registered_builder_returns_sharded_iterators(fake_scenic, toy_config):
  module, registry = fake_scenic
  assert module.register() is True  # Registered on import; a second call changes nothing.
  builder = registry._REGISTRY[module.DATASET_NAME]
  dataset = builder(batch_size=4, eval_batch_size=4, num_shards=2, dtype_str='bfloat16',
                    shuffle_seed=0, rng=None, dataset_configs=toy_config.dataset,
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
