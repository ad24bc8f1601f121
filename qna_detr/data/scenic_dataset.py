"""The input pipeline in Scenic's dataset registry (Scenic is optional).

When Scenic is importable, importing this module registers the pipeline as `DATASET_NAME`, so
that a Scenic config can say `config.dataset_name = 'qna_detr_coco'` and put the
`config.dataset` keys of `qna_detr.data.dataset_config.default_config()` in
`config.dataset_configs`. Without Scenic the module imports and registers nothing.
`QNA_DETR_DISABLE_SCENIC=1` makes it (and the launcher) act as if Scenic were absent.

Batches come in Scenic's detection layout by default (`dataset_configs.batch_layout =
'scenic'`, what Scenic's DETR trainer reads): 'inputs', 'padding_mask' (1.0 on image pixels),
'batch_mask' (1.0 for real examples) and a 'label' dict with 'boxes' (normalized cxcywh),
'labels' (1..C, 0 = padding, so `num_classes` counts the padding class), 'image/id',
'orig_size' and 'size'. `batch_layout = 'qna_detr'` gives this project's own batches
(`pipeline` module doc). Either is reshaped to [num_shards, B / num_shards, ...].
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qna_detr.data import dataset_config
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


LAYOUTS = ('scenic', 'qna_detr')


def scenic_layout(batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """A project batch in Scenic's detection layout (see the module doc)."""
  return {
      'inputs': batch['inputs'],
      'padding_mask': (~batch['padding_mask']).astype(np.float32),
      'batch_mask': batch['valid'].astype(np.float32),
      'label': {'boxes': batch['boxes'],
                'labels': np.where(batch['box_mask'], batch['labels'] + 1, 0).astype(np.int32),
                'image/id': batch['image_id'], 'orig_size': batch['orig_size'],
                'size': batch['size']},
  }


def _shard(batch: dict[str, Any], num_shards: int, dtype: Any) -> dict[str, Any]:
  """[B, ...] -> [num_shards, B / num_shards, ...] (Scenic's pmap layout); images to dtype."""
  batch = {**batch, 'inputs': batch['inputs'].astype(dtype)}
  return jax.tree.map(lambda v: v.reshape((num_shards, -1) + v.shape[1:]), batch)


def _seed(shuffle_seed: int | None, rng: Any) -> int:
  """Scenic's shuffle seed, else one drawn from its rng, else a new one each run."""
  if shuffle_seed is not None:
    return int(shuffle_seed)
  if rng is not None:
    return int(jax.random.randint(rng, (), 0, 2**31 - 1))
  return int(np.random.SeedSequence().generate_state(1)[0] >> 1)


def get_dataset(*, batch_size: int, eval_batch_size: int, num_shards: int,
                dtype_str: str = 'float32', shuffle_seed: int | None = 0, rng: Any = None,
                dataset_configs: ml_collections.ConfigDict | None = None,
                dataset_service_address: str | None = None) -> Any:
  """Scenic's dataset builder: train and validation iterators and their metadata.

  `batch_size` and `eval_batch_size` are per process, as Scenic passes them. The training
  order and augmentation follow `shuffle_seed`, or, where it is None (Scenic's default), a
  seed drawn from `rng`. The validation iterator cycles over fixed-length passes;
  `meta_data['num_eval_examples']` counts their filler examples too (batch_mask 0), so that
  Scenic's ceil(num_eval_examples / eval_batch_size) steps make exactly one pass.
  """
  if dataset_service_address:
    raise ValueError('The tf.data service is not supported by the qna_detr input pipeline')
  configs = dict(dataset_configs or {})
  layout = configs.pop('batch_layout', 'scenic')
  if layout not in LAYOUTS:
    raise ValueError(f'dataset_configs.batch_layout must be one of {LAYOUTS}, got {layout!r}')
  cfg = dataset_config.default_config()
  cfg.update(configs)
  config = ml_collections.ConfigDict({'dataset': cfg})
  processes = jax.process_count()
  train = pipeline.build_dataset(config, split='train', global_batch_size=batch_size * processes,
                                 shuffle_seed=_seed(shuffle_seed, rng), train=True)
  val = pipeline.build_dataset(config, split='val',
                               global_batch_size=eval_batch_size * processes,
                               shuffle_seed=0, train=False)
  dtype = jnp.dtype(dtype_str)

  def passes() -> Iterator[dict[str, np.ndarray]]:
    return itertools.chain.from_iterable(
        val.iterator(fixed_length=True) for _ in itertools.count())

  largest = max(train.bucket_shapes, key=lambda s: s[0] * s[1])
  scenic = layout == 'scenic'
  shape = (lambda b: _shard(scenic_layout(b), num_shards, dtype)) if scenic else (
      lambda b: _shard(b, num_shards, dtype))
  meta_data = {
      # Scenic's layout counts the padding class 0; the project's labels are 0..C-1.
      'num_classes': train.num_classes + int(scenic),
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
      train_iter=(shape(b) for b in train),
      valid_iter=(shape(b) for b in passes()),
      test_iter=None, meta_data=meta_data)


def register() -> bool:
  """Registers `get_dataset` with Scenic under `DATASET_NAME`; False without Scenic."""
  if not available():
    return False
  if DATASET_NAME not in datasets.DatasetRegistry.list():
    datasets.DatasetRegistry.add(DATASET_NAME, get_dataset)
  return True


register()
