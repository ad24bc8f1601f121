"""Where a train step's batches come from (`config.train_input`).

  'images'           the training split through the augmenting input pipeline; the tf.data
                     iterator is checkpointed with the state, so a resumed run reads the same
                     batches;
  'cached_features'  the frozen backbone's feature maps of every training image, computed once
                     (`feature_cache`); the step trains the detector minus its backbone.
Each source is made before the state is restored (its iterator, if any, restores with it) and
started after, from the restored parameters.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import ml_collections
import tensorflow as tf

from qna_detr.data import batching
from qna_detr.data.pipeline import DetectionDataset
from qna_detr.detectors import DetectorDef
from qna_detr.train import feature_cache

Batch = dict[str, jax.Array]


class TrainInput(Protocol):
  """A source of global batches for the train step."""

  iterator: tf.data.Iterator | None  # Checkpointed with the state; None: nothing to save.

  def start(self, params: Any, first_step: int, sharding: jax.sharding.Sharding
            ) -> tuple[Callable[[], Batch], DetectorDef]:
    """(next batch of steps first_step, first_step + 1, ...; the detector the step trains)."""


class ImageInput:
  """The training split's augmented batches."""

  def __init__(self, config: ml_collections.ConfigDict, detector: DetectorDef,
               dataset: DetectionDataset):
    del config
    self._detector = detector
    self.iterator: Iterator = iter(dataset.tf_dataset)

  def start(self, params, first_step, sharding):
    del params, first_step  # The restored iterator knows where it is.
    keys = self._detector.batch_keys
    return lambda: batching.next_global_batch(self.iterator, sharding, keys), self._detector


class CachedFeatureInput:
  """Batches of cached backbone features (`feature_cache`), a function of the step number."""

  def __init__(self, config: ml_collections.ConfigDict, detector: DetectorDef,
               dataset: DetectionDataset):
    del dataset  # The cache reads the split in evaluation order instead.
    self._config = config
    self._detector = detector
    self.iterator = None

  def start(self, params, first_step, sharding):
    config = self._config
    images = feature_cache.images_of_training_split(config)
    cache = feature_cache.build(self._detector, jax.device_get(params['backbone']), images)
    batches = feature_cache.batches(cache, first_step, config.batch_size // jax.process_count(),
                                    config.rng_seed)
    return (lambda: batching.to_global_arrays(next(batches), sharding),
            self._detector.on_features())


SOURCES = {'images': ImageInput, 'cached_features': CachedFeatureInput}


def build(config: ml_collections.ConfigDict, detector: DetectorDef,
          dataset: DetectionDataset) -> TrainInput:
  """The source `config.train_input` names (checked by `config_checks.check_config`)."""
  return SOURCES[config.train_input](config, detector, dataset)
