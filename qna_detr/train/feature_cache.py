"""The frozen backbone's features of every training image, computed once and kept in memory.

With a frozen backbone (`config.optimizer.freeze_backbone`) the backbone is a constant function
of its input, so the train steps can read its features instead of running it, and the
augmenting input pipeline no longer competes with the steps for the host. The price is the
augmentation: the cache holds each training image and its horizontal flip, resized as for
evaluation, so DETR's random multi-scale resize and crop are given up; and the memory: it
needs one padded shape for all images (small, fixed-size data such as the toy set). Features
are those of the backbone in inference mode (no stochastic depth), in float32.

The cache is rebuilt from the frozen backbone at the start of every run, and a step's batch is
a function of the seed and the step number alone, so a resumed run reads the batches an
uninterrupted one would.
"""
import collections
from collections.abc import Iterator
import dataclasses
import functools
import logging
import time

import jax
import ml_collections
import numpy as np

from qna_detr import parallel
from qna_detr.data import batching
from qna_detr.data import pipeline
from qna_detr.data.pipeline import DetectionDataset
from qna_detr.detectors import DetectorDef

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FeatureCache:
  """The feature maps a detector reads, with their masks and targets, one entry per (image,
  flip); a batch's 'inputs' and 'padding_mask' are tuples, one map per level."""
  features: tuple[np.ndarray, ...]  # Per level [N, h, w, C] float32.
  padding_mask: tuple[np.ndarray, ...]  # Per level [N, h, w] bool.
  targets: dict[str, np.ndarray]  # The detector's target keys, each [N, ...].

  def __len__(self) -> int:
    return len(self.features[0])

  @property
  def nbytes(self) -> int:
    return sum(f.nbytes for f in self.features)

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
    return {'inputs': tuple(f[rows] for f in self.features),
            'padding_mask': tuple(m[rows] for m in self.padding_mask),
            **{k: v[rows] for k, v in self.targets.items()}}


@functools.lru_cache(maxsize=2)
def _epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
  """The epoch's permutation, drawn once rather than at every step of the epoch."""
  return np.random.default_rng([seed, epoch]).permutation(size)


def flip_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The batch's images mirrored left-right inside their unpadded extent, and their boxes
  (normalized cxcywh, with `box_mask`)."""
  images = batch['inputs'].copy()
  for image, (_, width) in zip(images, batch['size']):
    image[:, :width] = image[:, :width][:, ::-1]
  boxes = batch['boxes'].copy()
  boxes[..., 0] = np.where(batch['box_mask'], 1.0 - boxes[..., 0], boxes[..., 0])
  return {**batch, 'inputs': images, 'boxes': boxes}


def images_of_training_split(config: ml_collections.ConfigDict) -> DetectionDataset:
  """The training split in evaluation order and transform: what the cache holds."""
  return pipeline.build_dataset(config, split='train', shuffle_seed=0, train=False,
                                global_batch_size=config.eval_batch_size)


def build(detector: DetectorDef, backbone_params, dataset: DetectionDataset) -> FeatureCache:
  """Runs the backbone once over `dataset` (this process's part of the training split, in
  evaluation order and transform), each image as it is and flipped, on this process's
  devices."""
  if len(dataset.bucket_shapes) != 1:
    raise ValueError(f'The feature cache needs one padded shape for all images; the dataset '
                     f'has {len(dataset.bucket_shapes)} (config.dataset.eval_bucket_shapes)')
  mesh = parallel.data_mesh(jax.local_devices())
  sharding = parallel.batch_sharding(mesh)
  forward = jax.jit(detector.backbone_features, out_shardings=parallel.replicated(mesh))
  features, masks = collections.defaultdict(list), collections.defaultdict(list)
  targets = {k: [] for k in detector.target_keys}
  start = time.time()
  for batch in dataset.iterator():
    keep = batch['valid']
    for view in (batch, flip_batch(batch)):
      arrays = batching.to_global_arrays(
          {k: view[k] for k in ('inputs', 'padding_mask')}, sharding)
      pyramid = jax.device_get(forward(backbone_params, arrays['inputs'],
                                       arrays['padding_mask']))
      for level, feature_map in enumerate(pyramid):
        features[level].append(np.asarray(feature_map.features, np.float32)[keep])
        masks[level].append(np.asarray(feature_map.mask)[keep])
      for key in detector.target_keys:
        targets[key].append(view[key][keep])
  cache = FeatureCache(tuple(np.concatenate(features[i]) for i in sorted(features)),
                       tuple(np.concatenate(masks[i]) for i in sorted(masks)),
                       {k: np.concatenate(v) for k, v in targets.items()})
  logger.info('Feature cache: %d entries of %s, %.0f MB, built in %.0fs', len(cache),
              ', '.join(str(f.shape[1:]) for f in cache.features), cache.nbytes / 2**20,
              time.time() - start)
  return cache


def batches(cache: FeatureCache, first_step: int, batch_size: int, seed: int
            ) -> Iterator[dict[str, np.ndarray]]:
  """The batches of steps first_step, first_step + 1, ..."""
  step = first_step
  while True:
    yield cache.batch(step, batch_size, seed)
    step += 1
