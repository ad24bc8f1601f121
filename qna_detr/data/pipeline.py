"""The public input pipeline: `build_dataset` and the dataset configs.

A batch is a dict of host-local numpy arrays (B = global_batch_size / process_count):
  inputs        float32 [B, H, W, 3]  ImageNet-normalized, 0.0 at padded pixels
  padding_mask  bool    [B, H, W]     True at padded pixels
  boxes         float32 [B, N, 4]     normalized (cx, cy, w, h) of the resized unpadded image
  labels        int32   [B, N]        contiguous labels 0..C-1
  box_mask      bool    [B, N]        True for real boxes (N = max_boxes)
  image_id      int64   [B]
  orig_size     int32   [B, 2]        original (height, width)
  size          int32   [B, 2]        resized unpadded (height, width)
  valid         bool    [B]           False for the filler examples of the last eval batches
(H, W) is one of the split's bucket shapes (`DetectionDataset.bucket_shapes`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from qna_detr.data import batching
from qna_detr.data import sources
from qna_detr.data.dataset_config import NAMES
from qna_detr.data import transforms

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
Example = sources.Example
@dataclasses.dataclass(frozen=True)
class DetectionDataset:
  """One split, batched for this process. `iter(ds)` yields batches (see the module doc).

  Training iterators repeat forever. Evaluation iterators make one pass over this process's
  examples, each exactly once; partial batches are completed with filler examples
  (`valid` False). With several processes, every process yields the same number of eval
  batches (`num_batches`, an upper bound of any process's pass), adding all-filler
  batches where it runs out first.
  """

  tf_dataset: tf.data.Dataset  # Batches of this process; partial at the end of eval.
  batch_size: int  # Per process.
  train: bool
  num_examples: int  # In the whole split.
  category_ids: tuple[int, ...]  # Contiguous label -> original category id.
  class_names: tuple[str, ...]
  bucket_shapes: tuple[tuple[int, int], ...]
  num_batches: int | None  # Eval: batches in a fixed-length pass; None for training.
  fixed_length: bool  # Eval passes have num_batches batches by default (several processes).
  ground_truth_fn: Callable[[], dict[str, Any]]

  @property
  def num_classes(self) -> int:
    """Number of object classes; labels are 0..num_classes-1, with no background class."""
    return len(self.category_ids)

  def coco_ground_truth(self) -> dict[str, Any]:
    """The split's annotations in COCO format with original category ids, crowd included."""
    return self.ground_truth_fn()

  def __iter__(self) -> Iterator[Batch]:
    return self.iterator()

  def iterator(self, *, fixed_length: bool | None = None) -> Iterator[Batch]:
    """A fresh iterator of numpy batches.

    Args:
      fixed_length: eval only: end every pass with all-filler batches up to `num_batches`
        (default: `self.fixed_length`), for loops that need the length in advance.
    """
    batches = self.tf_dataset.as_numpy_iterator()
    if self.train:
      yield from batches
      return
    count, batch = 0, None
    for batch in batches:
      yield batching.pad_to_batch_size(batch, self.batch_size)
      count += 1
    fixed_length = self.fixed_length if fixed_length is None else fixed_length
    while fixed_length and count < self.num_batches:
      yield batching.pad_to_batch_size({k: v[:0] for k, v in batch.items()}, self.batch_size)
      count += 1


def _split_prefix(split: str) -> str:
  if split == 'train':
    return 'train'
  if split in ('val', 'validation'):
    return 'val'
  raise ValueError(f"split must be 'train' or 'val' (or 'validation'), got {split!r}")


def _make_source(cfg: ml_collections.ConfigDict, prefix: str, shuffle_seed: int | None,
                 process_index: int, process_count: int) -> sources.Source:
  shard = {'process_index': process_index, 'process_count': process_count}
  if cfg.name == 'tfds_coco':
    return sources.tfds_coco(cfg.tfds_name, cfg[f'{prefix}_split'], data_dir=cfg.data_dir or None,
                             shuffle_seed=shuffle_seed, **shard)
  if cfg.name != 'coco_folder':
    raise ValueError(f'Unknown config.dataset.name {cfg.name!r}; expected one of {NAMES}')
  folder = {k: cfg[k] for k in (f'{prefix}_json', f'{prefix}_images')}
  unset = [k for k, v in folder.items() if not v]
  if unset:
    raise ValueError(f'config.dataset.{unset[0]} must be set for a coco_folder dataset')
  return sources.coco_folder(folder[f'{prefix}_json'], folder[f'{prefix}_images'],
                             skip_bad_examples=cfg.skip_bad_examples, **shard)


def augmentation(cfg: ml_collections.ConfigDict, train: bool) -> transforms.Augmentation:
  """DETR's train transform (flip, multi-scale or resize-crop-resize) or its eval resize."""
  if not train:
    return transforms.Augmentation(scales=(cfg.eval_scale,), max_size=cfg.eval_max_size)
  return transforms.Augmentation(
      scales=tuple(cfg.train_scales), max_size=cfg.train_max_size, flip=True,
      crop_resize_scales=tuple(cfg.crop_resize_scales), crop_min_size=cfg.crop_min_size,
      crop_max_size=cfg.crop_max_size)


def output_sizes(image_sizes: np.ndarray, aug: transforms.Augmentation,
                 seed: int = 0) -> np.ndarray:
  """One draw of the transform's output size for each original (height, width)."""
  ds = tf.data.Dataset.from_tensor_slices(np.asarray(image_sizes, np.int32)).enumerate()
  ds = ds.map(lambda i, hw: transforms.sample_geometry(
      hw[0], hw[1], tf.random.experimental.stateless_fold_in([seed, 0], i), aug)['size'])
  return np.concatenate(list(ds.batch(4096).as_numpy_iterator())).astype(np.int64)


def _bucket_shapes(cfg: ml_collections.ConfigDict, source: sources.Source,
                   aug: transforms.Augmentation, train: bool) -> tuple[tuple[int, int], ...]:
  key = 'train_bucket_shapes' if train else 'eval_bucket_shapes'
  if cfg[key]:
    shapes = tuple(tuple(int(v) for v in shape) for shape in cfg[key])
    short, long = aug.max_output_shape
    if not all(any(h >= a and w >= b for h, w in shapes) for a, b in [(short, long),
                                                                         (long, short)]):
      raise ValueError(f'config.dataset.{key} {[list(s) for s in shapes]} has no shape that '
                       f'holds a {short} x {long} image, or no shape that holds a {long} x '
                       f'{short} one')
    return shapes
  sizes = source.image_sizes(cfg.bucket_sample_size)
  if train:  # Several random draws per image of a small split.
    sizes = np.resize(sizes, (cfg.bucket_sample_size, 2))
  shapes = batching.derive_buckets(
      output_sizes(sizes, aug),
      num_buckets=cfg.num_buckets, multiple=cfg.bucket_multiple,
      max_output_shape=aug.max_output_shape, max_rescale=_max_rescale(cfg, train))
  logger.info('Derived %s: %s', key, [list(s) for s in shapes])
  return shapes


def _max_rescale(cfg: ml_collections.ConfigDict, train: bool) -> float:
  return float(cfg.bucket_max_rescale) if train else 1.0


def _example_fn(source: sources.Source, aug: transforms.Augmentation,
                buckets: tuple[tuple[int, int], ...], max_rescale: float, max_boxes: int):
  """element, seed -> (bucket index, example): the resized uint8 image, unpadded, and targets.

  Images stay uint8 (as PIL's resize leaves them in DETR) and unpadded until batching, so
  that the examples waiting for their bucket's batch to fill take a quarter of the memory.
  """
  bucket_table = tf.constant(buckets, tf.int32)

  def fn(element: dict[str, tf.Tensor], seed: tf.Tensor) -> tuple[tf.Tensor, Example]:
    ex = source.load(element)
    orig_size = tf.shape(ex['image'])[:2]
    boxes, labels = transforms.clip_boxes(ex['boxes'], ex['labels'], orig_size[0], orig_size[1])
    index, image, boxes, labels, size = _transform(ex['image'], boxes, labels, seed, aug,
                                                   bucket_table, max_rescale)

    num_boxes = tf.shape(boxes)[0]
    if num_boxes > max_boxes:
      tf.print('WARNING: image', ex['image_id'], 'has', num_boxes,
               f'boxes; dropped those beyond max_boxes={max_boxes}')
    kept = tf.minimum(num_boxes, max_boxes)
    box_pad = [[0, max_boxes - kept]]
    boxes = transforms.to_normalized_cxcywh(boxes[:kept], size[0], size[1])
    return index, {
        'image': image,
        'boxes': tf.ensure_shape(tf.pad(boxes, box_pad + [[0, 0]]), [max_boxes, 4]),
        'labels': tf.ensure_shape(tf.pad(labels[:kept], box_pad), [max_boxes]),
        'box_mask': tf.ensure_shape(tf.pad(tf.ones([kept], tf.bool), box_pad), [max_boxes]),
        'image_id': tf.cast(ex['image_id'], tf.int64),
        'orig_size': orig_size,
        'size': size,
        'valid': tf.constant(True),
    }

  return fn


def _transform(image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor,
               aug: transforms.Augmentation, bucket_table: tf.Tensor, max_rescale: float):
  """(bucket index, uint8 image resized to fit it, boxes, labels, size) of one image."""
  geometry = transforms.sample_geometry(tf.shape(image)[0], tf.shape(image)[1], seed, aug)
  index, size = batching.assign_buckets(geometry['size'][None], bucket_table, max_rescale)
  index, size = index[0], size[0]
  image, boxes, labels = transforms.apply_geometry(image, boxes, labels, geometry, size)
  image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  return index, image, boxes, labels, size


def eval_image(image: tf.Tensor, cfg: ml_collections.ConfigDict,
               buckets: tuple[tuple[int, int], ...]) -> tuple[int, tf.Tensor]:
  """(bucket index, uint8 [h, w, 3] image resized as evaluation resizes it) of one decoded
  [H, W, 3] uint8 image; `cfg` is `config.dataset`, `buckets` its evaluation shapes."""
  index, image, _, _, _ = _transform(
      tf.convert_to_tensor(image, tf.uint8), tf.zeros([0, 4], tf.float32),
      tf.zeros([0], tf.int32), tf.constant([0, 0], tf.int64), augmentation(cfg, train=False),
      tf.constant(buckets, tf.int32), 1.0)
  return int(index), image


def _batch_bucket(buckets: tuple[tuple[int, int], ...], batch_size: int, drop_remainder: bool):
  """group_by_window's reduce function: batches one bucket's examples, padded to its shape."""
  bucket_table = tf.constant(buckets, tf.int64)

  def reduce(index: tf.Tensor, window: tf.data.Dataset) -> tf.data.Dataset:
    window = window.map(lambda _, ex: ex)
    shapes = {k: spec.shape for k, spec in window.element_spec.items()}
    shapes['image'] = tf.concat([bucket_table[index], [3]], 0)
    return window.padded_batch(batch_size, padded_shapes=shapes, drop_remainder=drop_remainder)

  return reduce


def finish_batch(batch: Example) -> Example:
  """Normalizes the padded uint8 images ('image' [B, H, W, 3], 'size' [B, 2] unpadded),
  with 0.0 and a True mask at padded pixels: 'inputs' and 'padding_mask'."""
  batch = dict(batch)
  image = batch.pop('image')
  rows = tf.range(tf.shape(image)[1])[None, :, None]
  cols = tf.range(tf.shape(image)[2])[None, None, :]
  padding_mask = (rows >= batch['size'][:, :1, None]) | (cols >= batch['size'][:, None, 1:])
  inputs = tf.where(padding_mask[..., None], 0.0, transforms.normalize_image(image))
  return {'inputs': inputs, 'padding_mask': padding_mask, **batch}


def build_dataset(config: ml_collections.ConfigDict, *, split: str, global_batch_size: int,
                  shuffle_seed: int, train: bool, process_index: int | None = None,
                  process_count: int | None = None,
                  source: sources.Source | None = None) -> DetectionDataset:
  """Builds one split of the dataset named by `config.dataset` for this process.

  Args:
    config: experiment config; `config.dataset` as in `default_config()`.
    split: 'train' or 'val' ('validation'): which split of the dataset config to read.
    global_batch_size: batch size over all processes (a multiple of their number).
    shuffle_seed: seed of the example order and of the augmentation (training only): the
      same seed gives the same batches.
    train: training (shuffled, augmented, repeated) or evaluation (one ordered pass).
    process_index: this process (default `jax.process_index()`); each reads its own shard.
    process_count: number of processes (default `jax.process_count()`).
    source: read this source instead of the split of `config.dataset` (e.g. an image
      folder, `image_folder.image_folder`), with the same transforms and buckets; its
      `elements` must be this process's part.

  Returns:
    The `DetectionDataset`.
  """
  cfg = config.dataset
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not a multiple of the '
                     f'{process_count} processes')
  batch_size = global_batch_size // process_count
  if source is None:
    source = _make_source(cfg, _split_prefix(split), shuffle_seed if train else None,
                          process_index, process_count)
  if source.num_examples < process_count:
    raise ValueError(f'Split {split!r} has {source.num_examples} examples, fewer than the '
                     f'{process_count} processes')
  aug = augmentation(cfg, train)
  buckets = _bucket_shapes(cfg, source, aug, train)
  example_fn = _example_fn(source, aug, buckets, _max_rescale(cfg, train), cfg.max_boxes)

  host_examples = -(-source.num_examples // process_count)  # The largest shard.
  ds = source.elements
  if train:
    ds = ds.shuffle(min(cfg.shuffle_buffer, host_examples), seed=shuffle_seed,
                    reshuffle_each_iteration=True).repeat()
    base_seed = tf.constant([shuffle_seed, process_index], tf.int64)
    ds = ds.enumerate().map(
        lambda i, el: example_fn(el, tf.random.experimental.stateless_fold_in(base_seed, i)),
        num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = ds.map(lambda el: example_fn(el, tf.constant([0, 0], tf.int64)),
                num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.group_by_window(key_func=lambda index, _: tf.cast(index, tf.int64),
                          reduce_func=_batch_bucket(buckets, batch_size, drop_remainder=train),
                          window_size=batch_size)
  ds = ds.map(finish_batch, num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options).prefetch(cfg.prefetch)

  num_batches = None
  if not train:  # An upper bound of the sum over buckets of ceil(examples / batch_size).
    num_batches = (host_examples + len(buckets) * (batch_size - 1)) // batch_size
  return DetectionDataset(
      tf_dataset=ds, batch_size=batch_size, train=train, num_examples=source.num_examples,
      category_ids=tuple(source.category_ids), class_names=tuple(source.class_names),
      bucket_shapes=buckets, num_batches=num_batches, fixed_length=process_count > 1,
      ground_truth_fn=functools.cache(source.ground_truth))
