"""The input pipeline in Scenic's dataset registry (Scenic is optional).

When Scenic is importable, importing this module registers the pipeline as `DATASET_NAME`, so
that a Scenic config can say `config.dataset_name = 'qna_detr_coco'` and put the
`config.dataset` keys of `qna_detr.data.pipeline.default_config()` in
`config.dataset_configs`. Without Scenic the module imports and registers nothing.
`QNA_DETR_DISABLE_SCENIC=1` makes it (and the launcher) act as if Scenic were absent.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qna_detr.data import pipeline

if os.environ.get('QNA_DETR_DISABLE_SCENIC'):  # Run without Scenic even where it is installed.
  dataset_utils = datasets = None
else:
  try:
    from scenic.dataset_lib import dataset_utils
    from scenic.dataset_lib import datasets
  except ImportError:
    dataset_utils = datasets = None


def available() -> bool:
  return datasets is not None


DATASET_NAME = 'qna_detr_coco'


def _shard(batch: dict[str, np.ndarray], num_shards: int, dtype: Any) -> dict[str, np.ndarray]:
  """[B, ...] -> [num_shards, B / num_shards, ...] (Scenic's pmap layout); images to dtype."""
  batch = {**batch, 'inputs': batch['inputs'].astype(dtype)}
  return {k: v.reshape((num_shards, -1) + v.shape[1:]) for k, v in batch.items()}


def get_dataset(*, batch_size: int, eval_batch_size: int, num_shards: int,
                dtype_str: str = 'float32', shuffle_seed: int | None = 0, rng: Any = None,
                dataset_configs: ml_collections.ConfigDict | None = None,
                dataset_service_address: str | None = None) -> Any:
  """Scenic's dataset builder: train and validation iterators and their metadata.

  `batch_size` and `eval_batch_size` are per process, as Scenic passes them. Batches are
  those of `pipeline.build_dataset`, reshaped to [num_shards, B / num_shards, ...]. The
  validation iterator cycles over fixed-length passes; `meta_data['num_eval_examples']`
  counts their filler examples too (`valid` False), so that Scenic's
  ceil(num_eval_examples / eval_batch_size) steps make exactly one pass.
  """
  del rng  # `shuffle_seed` drives all the randomness, reproducibly.
  if dataset_service_address:
    raise ValueError('The tf.data service is not supported by the qna_detr input pipeline')
  cfg = pipeline.default_config()
  cfg.update(dict(dataset_configs or {}))
  config = ml_collections.ConfigDict({'dataset': cfg})
  processes = jax.process_count()
  train = pipeline.build_dataset(config, split='train', global_batch_size=batch_size * processes,
                                 shuffle_seed=shuffle_seed or 0, train=True)
  val = pipeline.build_dataset(config, split='val',
                               global_batch_size=eval_batch_size * processes,
                               shuffle_seed=0, train=False)
  dtype = jnp.dtype(dtype_str)

  def passes() -> Iterator[dict[str, np.ndarray]]:
    return itertools.chain.from_iterable(
        val.iterator(fixed_length=True) for _ in itertools.count())

  largest = max(train.bucket_shapes, key=lambda s: s[0] * s[1])
  meta_data = {
      'num_classes': train.num_classes,  # No background class.
      'category_ids': train.category_ids,
      'label_to_name': dict(enumerate(train.class_names)),
      'input_shape': [-1, largest[0], largest[1], 3],
      'input_dtype': dtype,
      'bucket_shapes': train.bucket_shapes,
      'num_train_examples': train.num_examples,
      'num_eval_examples': val.num_batches * eval_batch_size * processes,
      'num_eval_images': val.num_examples,
      'coco_ground_truth': val.coco_ground_truth,
      'target_is_onehot': False,
  }
  return dataset_utils.Dataset(
      train_iter=(_shard(b, num_shards, dtype) for b in train),
      valid_iter=(_shard(b, num_shards, dtype) for b in passes()),
      test_iter=None, meta_data=meta_data)


def register() -> bool:
  """Registers `get_dataset` with Scenic under `DATASET_NAME`; False without Scenic."""
  if not available():
    return False
  if DATASET_NAME not in datasets.DatasetRegistry.list():
    datasets.DatasetRegistry.add(DATASET_NAME, get_dataset)
  return True


register()
