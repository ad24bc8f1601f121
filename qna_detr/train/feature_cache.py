"""The frozen backbone's features of every training image, computed once and kept in memory.

With `config.optimizer.freeze_backbone` the backbone is a constant function of its input, so
the DETR steps can read its features instead of running it: on the toy config (2-core CPU) a
step then takes about 30 ms instead of 60 (the backbone's forward pass and the augmenting
input pipeline, which competes with XLA for the cores, are gone). The price is the
augmentation: the cache holds each training image and its horizontal flip, resized as for
evaluation, so DETR's random multi-scale resize and crop are given up. Features are those of
the backbone in inference mode (no stochastic depth), in float32.

The cache is rebuilt from the (frozen) backbone at the start of every run, and a step's batch
is a function of the seed and the step number alone, so a resumed run reads the batches an
uninterrupted one would.
"""
from collections.abc import Iterator
import dataclasses
import functools
import time

from absl import logging
import flax.linen as nn
import jax
import numpy as np

from qna_detr import parallel
from qna_detr.backbones import base
from qna_detr.data import batching
from qna_detr.data.pipeline import DetectionDataset
from qna_detr.detr import DETR
from qna_detr.train.steps import TARGET_KEYS

Array = jax.Array


class CachedFeatures(nn.Module):
  """Stands in for the backbone: its 'images' are the cached feature maps themselves."""

  @nn.compact
  def __call__(self, features: Array, padding_mask: Array, *, train: bool
               ) -> list[base.FeatureMap]:
    del train
    return [base.FeatureMap(features, padding_mask)]


def head_model(model: DETR) -> DETR:
  """`model` reading feature maps (as 'images') where it ran its backbone."""
  return model.clone(backbone=CachedFeatures(), feature_level=-1)


def backbone_features(model: DETR, backbone_params, images: Array, padding_mask: Array
                      ) -> base.FeatureMap:
  """The feature map `model` reads, computed by its backbone in inference mode."""
  return model.backbone.apply({'params': backbone_params}, images, padding_mask,
                              train=False)[model.feature_level]


@dataclasses.dataclass(frozen=True)
class FeatureCache:
  """Feature maps with their masks and targets, one entry per (image, flip)."""
  features: np.ndarray  # [N, h, w, C] float32
  padding_mask: np.ndarray  # [N, h, w] bool
  boxes: np.ndarray  # [N, max_boxes, 4] normalized (cx, cy, w, h)
  labels: np.ndarray  # [N, max_boxes] int32
  box_mask: np.ndarray  # [N, max_boxes] bool

  def __len__(self) -> int:
    return len(self.features)

  def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """The batch of 1-based `step`: epochs of `len(self) // batch_size` batches, each epoch a
    new permutation drawn from (seed, epoch); the last incomplete batch of an epoch is
    skipped."""
    per_epoch = len(self) // batch_size
    if per_epoch < 1:
      raise ValueError(f'The feature cache has {len(self)} entries, fewer than the batch of '
                       f'{batch_size}')
    epoch, index = divmod(step - 1, per_epoch)
    rows = _epoch_order(len(self), seed, epoch)[index * batch_size:(index + 1) * batch_size]
    return {'inputs': self.features[rows], 'padding_mask': self.padding_mask[rows],
            **{k: getattr(self, k)[rows] for k in TARGET_KEYS}}


@functools.lru_cache(maxsize=2)
def _epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
  """The epoch's permutation, drawn once rather than at every step of the epoch."""
  return np.random.default_rng([seed, epoch]).permutation(size)


def flip_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The batch's images mirrored left-right inside their unpadded extent, and their boxes."""
  images = batch['inputs'].copy()
  for image, (_, width) in zip(images, batch['size']):
    image[:, :width] = image[:, :width][:, ::-1]
  boxes = batch['boxes'].copy()
  boxes[..., 0] = np.where(batch['box_mask'], 1.0 - boxes[..., 0], boxes[..., 0])
  return {**batch, 'inputs': images, 'boxes': boxes}


def build(model: DETR, backbone_params, dataset: DetectionDataset) -> FeatureCache:
  """Runs the backbone once over `dataset` (this process's part of the training split, in
  evaluation order and transform), each image as it is and flipped, on this process's
  devices."""
  if len(dataset.bucket_shapes) != 1:
    raise ValueError(f'The feature cache needs one padded shape for all images; the dataset '
                     f'has {len(dataset.bucket_shapes)} (config.dataset.eval_bucket_shapes)')
  mesh = parallel.data_mesh(jax.local_devices())
  sharding = parallel.batch_sharding(mesh)
  forward = jax.jit(functools.partial(backbone_features, model),
                    out_shardings=parallel.replicated(mesh))
  parts = {k: [] for k in ('features', 'padding_mask', *TARGET_KEYS)}
  start = time.time()
  for batch in dataset.iterator():
    keep = batch['valid']
    for view in (batch, flip_batch(batch)):
      arrays = batching.to_global_arrays(
          {k: view[k] for k in ('inputs', 'padding_mask')}, sharding)
      feature_map = jax.device_get(forward(backbone_params, arrays['inputs'],
                                           arrays['padding_mask']))
      parts['features'].append(np.asarray(feature_map.features, np.float32)[keep])
      parts['padding_mask'].append(np.asarray(feature_map.mask)[keep])
      for key in TARGET_KEYS:
        parts[key].append(view[key][keep])
  cache = FeatureCache(**{k: np.concatenate(v) for k, v in parts.items()})
  logging.info('Feature cache: %d entries of %s, %.0f MB, built in %.0fs', len(cache),
               cache.features.shape[1:], cache.features.nbytes / 2**20, time.time() - start)
  return cache


def batches(cache: FeatureCache, first_step: int, batch_size: int, seed: int
            ) -> Iterator[dict[str, np.ndarray]]:
  """The batches of steps first_step, first_step + 1, ..."""
  step = first_step
  while True:
    yield cache.batch(step, batch_size, seed)
    step += 1
