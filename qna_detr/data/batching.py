"""Batching into a few fixed padded shapes ("buckets"), and host batches to global arrays.

`jit` compiles one program per input shape, so batches come in a small fixed set of padded
shapes. Padding every image to max_size x max_size (what Scenic's DETR pipeline does) wastes
about half of the backbone's work on COCO; instead each example goes to the bucket that
needs the fewest padded pixels, and the bucket set is chosen greedily to minimize the padded
pixels of a sample of the split's output sizes.

A training image may be rescaled by a factor in [1/max_rescale, max_rescale] to fill its
bucket better: this turns DETR's discrete scale set into a slightly jittered one and cuts
the padding by about half at COCO sizes (set `bucket_max_rescale = 1` for DETR's exact
sizes). Evaluation never rescales.

Multi-host: every process batches its own shard, so two hosts may produce different bucket
shapes at the same step. `next_global_batch` agrees on the step's shape (the elementwise max
of the processes' shapes), pads with `pad_batch`, then builds global arrays with
`to_global_arrays`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow as tf

Batch = dict[str, np.ndarray]
Shape = tuple[int, int]


def fit_to_buckets(sizes, buckets, max_rescale: float) -> tuple[tf.Tensor, tf.Tensor]:
  """How each image size fits each bucket.

  Args:
    sizes: [n, 2] image (height, width).
    buckets: [k, 2] bucket (height, width).
    max_rescale: largest factor (>= 1) by which an image may be enlarged or shrunk to fit.

  Returns:
    fitted: int32 [n, k, 2], the image size rescaled to fill the bucket as far as
      `max_rescale` allows (shrunk just enough to fit where even 1/max_rescale is not enough).
    padded: float64 [n, k], padded pixels; +inf where the image does not fit within the
      allowed rescaling.
  """
  sizes = tf.cast(sizes, tf.float64)[:, None, :]
  buckets = tf.cast(buckets, tf.float64)[None, :, :]
  fit = tf.reduce_min(buckets / sizes, axis=-1)
  scale = tf.minimum(fit, max_rescale)
  fitted = tf.minimum(tf.round(sizes * scale[..., None]), buckets)
  padded = tf.reduce_prod(buckets, -1) - tf.reduce_prod(fitted, -1)
  padded = tf.where(fit * max_rescale >= 1.0, padded, np.inf)
  return tf.cast(fitted, tf.int32), padded


def assign_buckets(sizes, buckets, max_rescale: float) -> tuple[tf.Tensor, tf.Tensor]:
  """Picks each image's bucket: the fewest padded pixels, else the least shrinking.

  Returns:
    index: int32 [n], the bucket of each image.
    size: int32 [n, 2], the image size to resize to.
  """
  fitted, padded = fit_to_buckets(sizes, buckets, max_rescale)
  area = tf.reduce_prod(fitted, -1)
  fits = tf.reduce_any(tf.math.is_finite(padded), axis=-1)
  index = tf.where(fits, tf.argmin(padded, axis=-1, output_type=tf.int32),
                   tf.argmax(area, axis=-1, output_type=tf.int32))
  return index, tf.gather(fitted, index, batch_dims=1)


def padding_waste(sizes, buckets: Sequence[Shape], max_rescale: float) -> float:
  """Padded pixels over all pixels when the given image sizes are put into the buckets."""
  index, fitted = assign_buckets(sizes, buckets, max_rescale)
  bucket_area = np.prod(np.asarray(buckets, np.float64), -1)[index.numpy()]
  return float(1.0 - np.prod(fitted.numpy().astype(np.float64), -1).sum() / bucket_area.sum())


def derive_buckets(sizes: np.ndarray, *, num_buckets: int, multiple: int,
                   max_output_shape: Shape, max_rescale: float) -> tuple[Shape, ...]:
  """Chooses up to `num_buckets` bucket shapes for a sample of output image sizes.

  Greedy selection over all shapes with sides a multiple of `multiple` (the backbone's
  total stride, so feature maps tile the padded image exactly), followed by two rounds of
  one-at-a-time swaps. Two cover buckets, (short, long) and (long, short) with the bounds of
  `max_output_shape` and of the sample, always stay, so that every image fits some bucket.

  Args:
    sizes: [n, 2] output (height, width) of the transform, e.g. from `sample_geometry`.
    num_buckets: most bucket shapes (>= 2).
    multiple: every bucket side is a multiple of it.
    max_output_shape: (shorter, longer) side bounds of the transform's output.
    max_rescale: as in `fit_to_buckets`.

  Returns:
    Bucket shapes (height, width), by increasing area.
  """
  if num_buckets < 2:
    raise ValueError(f'num_buckets must be at least 2 (the two cover shapes), got {num_buckets}')
  sizes = np.asarray(sizes, np.int64)
  round_up = lambda x: int(-(-x // multiple) * multiple)
  short = round_up(max(max_output_shape[0], sizes.min(1).max()))
  long = round_up(max(max_output_shape[1], sizes.max(1).max()))
  sides = np.arange(multiple, long + 1, multiple)
  candidates = np.stack(np.meshgrid(sides, sides, indexing='ij'), -1).reshape(-1, 2)
  padded = fit_to_buckets(sizes, candidates, max_rescale)[1].numpy()
  index = {tuple(c): i for i, c in enumerate(candidates.tolist())}
  chosen = list(dict.fromkeys([index[(short, long)], index[(long, short)]]))
  num_fixed = len(chosen)

  def best_addition(others: list[int]) -> tuple[int, float]:
    base = padded[:, others].min(1)
    totals = np.minimum(base[:, None], padded).sum(0)
    totals[others] = np.inf
    best = int(np.argmin(totals))
    return best, float(totals[best])

  while len(chosen) < num_buckets:
    best, total = best_addition(chosen)
    if total >= padded[:, chosen].min(1).sum():
      break
    chosen.append(best)
  for _ in range(2):
    for j in range(num_fixed, len(chosen)):
      chosen[j] = best_addition(chosen[:j] + chosen[j + 1:])[0]
  shapes = {tuple(int(v) for v in candidates[i]) for i in chosen}
  return tuple(sorted(shapes, key=lambda s: (s[0] * s[1], s)))


def pad_batch(batch: Batch, shape: Shape) -> Batch:
  """Pads a batch's images to a larger (H, W): `inputs` with 0.0, `padding_mask` with True.

  Multi-host training uses it to bring every host's batch to the step's common shape (see
  the module docstring). Boxes are normalized to the unpadded image, so they stay valid.
  """
  height, width = batch['inputs'].shape[1:3]
  if shape[0] < height or shape[1] < width:
    raise ValueError(f'Cannot pad a batch of shape {(height, width)} to the smaller {shape}')
  pad = [(0, 0), (0, shape[0] - height), (0, shape[1] - width)]
  return {
      **batch,
      'inputs': np.pad(batch['inputs'], pad + [(0, 0)]),
      'padding_mask': np.pad(batch['padding_mask'], pad, constant_values=True),
  }


def pad_to_batch_size(batch: Batch, batch_size: int) -> Batch:
  """Appends filler examples (`valid` False) up to `batch_size` examples.

  A filler is an all-zero image without padding (so that attention over it stays finite),
  with no boxes and `size` = `orig_size` = the padded shape.
  """
  missing = batch_size - len(batch['valid'])
  if not missing:
    return batch
  filler = {k: np.zeros((missing,) + v.shape[1:], v.dtype) for k, v in batch.items()}
  filler['size'][:] = filler['orig_size'][:] = batch['inputs'].shape[1:3]
  return {k: np.concatenate([batch[k], filler[k]]) for k in batch}


def to_global_arrays(batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host-local numpy batch -> global `jax.Array`s split along the batch dimension.

  Every process passes its own batch (leading dimension global_batch / process_count) of the
  same padded shape (see `pad_batch`) and the same `sharding`, e.g.
  `NamedSharding(mesh, PartitionSpec('data'))`.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def next_global_batch(iterator: Iterator[dict[str, Any]], sharding: jax.sharding.Sharding,
                      keys: Sequence[str]) -> dict[str, jax.Array]:
  """The next host batch's `keys`, padded to the shape all processes agree on, as global
  arrays."""
  batch = {k: v.numpy() for k, v in next(iterator).items() if k in keys}
  if jax.process_count() > 1:
    shapes = multihost_utils.process_allgather(np.asarray(batch['inputs'].shape[1:3]))
    batch = pad_batch(batch, tuple(int(s) for s in np.max(shapes, axis=0)))
  return to_global_arrays(batch, sharding)
