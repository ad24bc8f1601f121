"""The trained detector as a Python object: `Detector.from_workdir(DIR)(images)`.

  from qna_detr import Detector
  detector = Detector.from_workdir('workdirs/toy')          # newest intact checkpoint
  found = detector('photo.jpg', score_threshold=0.5)        # or a PIL image, an HxWx3 array
  found.boxes, found.scores, found.labels, found.class_names  # boxes: x0, y0, x1, y1 pixels

Images go through the evaluation transform (the run's resize, its evaluation bucket shapes,
ImageNet normalization) and the detector's post-processing, as in evaluation; they are
batched per bucket shape, and the network is compiled once per bucket shape. Files are
decoded by TensorFlow's decoder, as in training and evaluation (a PIL decode of the same JPEG
may differ by a few levels).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Union

import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from qna_detr import detectors
from qna_detr import workdir as run_files
from qna_detr.data import pipeline

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Detections:
  """The detections of one image, best first."""
  boxes: np.ndarray  # float32 [N, 4]: x0, y0, x1, y1 in the image's own pixels.
  scores: np.ndarray  # float32 [N]
  labels: np.ndarray  # int32 [N]: contiguous labels 0..C-1.
  category_ids: np.ndarray  # int64 [N]: the dataset's category ids.
  class_names: list[str]

  def __len__(self) -> int:
    return len(self.scores)


def load_image(image: ImageInput) -> np.ndarray:
  """[H, W, 3] uint8 RGB of a file path, a PIL image or an array; errors name the input."""
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'No image file at {path}')
    try:
      return tf.io.decode_image(tf.io.read_file(path), channels=3,
                                expand_animations=False).numpy()
    except tf.errors.OpError as e:
      raise ValueError(f'{path} is not a readable image ({e.message.strip()[:200]})') from None
  if isinstance(image, Image.Image):
    return np.asarray(image.convert('RGB'))
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
    raise ValueError(f'An image array must be [H, W, 3] uint8, got {array.shape} '
                     f'{array.dtype}')
  return array


class Detector:
  """A trained detector: its `DetectorDef`, parameters, classes and evaluation transform."""

  def __init__(self, run: run_files.TrainedRun):
    config = run.config
    self.run = run
    self.config = config
    self.detector: detectors.DetectorDef = run.detector
    self.params = jax.device_put(run.params)
    self.class_names = list(run.class_names)
    self.category_ids = np.asarray(run.category_ids, np.int64)
    self.bucket_shapes = run.eval_bucket_shapes
    self.batch_size = config.eval_batch_size
    self._predict = jax.jit(lambda p, inputs, mask, sizes: run.detector.predict(
        p, inputs, mask, sizes, config.eval_top_k))

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: str | None = None,
                   config: ml_collections.ConfigDict | None = None) -> Detector:
    """The run in `workdir` (its config.json), at `checkpoint` (a step directory; default:
    the newest intact one). A `config` given must be the run's."""
    return cls(run_files.load_run(workdir, checkpoint, config))

  @classmethod
  def from_checkpoint(cls, path: str) -> Detector:
    """The detector of a step directory WORKDIR/checkpoints/<step>."""
    path = os.path.abspath(path)
    return cls.from_workdir(os.path.dirname(os.path.dirname(path)), checkpoint=path)

  def preprocess(self, image: np.ndarray) -> tuple[int, np.ndarray]:
    """(bucket index, uint8 image resized as evaluation resizes it)."""
    index, resized = pipeline.eval_image(image, self.config.dataset, self.bucket_shapes)
    return index, resized.numpy()

  def _run_bucket(self, index: int, items: list[tuple[int, np.ndarray, np.ndarray]]
                  ) -> dict[int, dict[str, np.ndarray]]:
    """{position: post-processed detections} of images of one bucket, in fixed-size batches
    (one compiled program per bucket shape)."""
    height, width = self.bucket_shapes[index]
    out = {}
    for start in range(0, len(items), self.batch_size):
      chunk = items[start:start + self.batch_size]
      images = np.zeros((self.batch_size, height, width, 3), np.uint8)
      sizes = np.full((self.batch_size, 2), (height, width), np.int32)
      orig = sizes.copy()
      for row, (_, resized, orig_size) in enumerate(chunk):
        images[row, :resized.shape[0], :resized.shape[1]] = resized
        sizes[row], orig[row] = resized.shape[:2], orig_size
      batch = pipeline.finish_batch({'image': tf.constant(images), 'size': tf.constant(sizes)})
      result = jax.device_get(self._predict(self.params, batch['inputs'].numpy(),
                                            batch['padding_mask'].numpy(), orig))
      for row, (position, _, _) in enumerate(chunk):
        out[position] = {k: v[row] for k, v in result.items()}
    return out

  def _detections(self, result: dict[str, np.ndarray], threshold: float) -> Detections:
    keep = result['scores'] >= threshold
    x, y, w, h = np.moveaxis(result['boxes'][keep].astype(np.float32), -1, 0)
    labels = result['labels'][keep].astype(np.int32)
    return Detections(boxes=np.stack([x, y, x + w, y + h], -1), scores=result['scores'][keep],
                      labels=labels, category_ids=self.category_ids[labels],
                      class_names=[self.class_names[i] for i in labels])

  def __call__(self, images: ImageInput | Sequence[ImageInput],
               score_threshold: float = 0.0) -> Detections | list[Detections]:
    """Detections of one image (a path, a PIL image or an [H, W, 3] uint8 array) or of a
    list of them; only those scoring >= `score_threshold`."""
    single = not isinstance(images, (list, tuple))
    pixels = [load_image(image) for image in ([images] if single else images)]
    buckets: dict[int, list] = {}
    for position, image in enumerate(pixels):
      index, resized = self.preprocess(image)
      buckets.setdefault(index, []).append((position, resized, image.shape[:2]))
    results = {}
    for index, items in buckets.items():
      results.update(self._run_bucket(index, items))
    found = [self._detections(results[i], score_threshold) for i in range(len(pixels))]
    return found[0] if single else found
