"""DETR's image and box transforms as TensorFlow ops, and the inverse box mapping.

Boxes travel through the transforms as absolute (x0, y0, x1, y1) pixel coordinates of the
current image, as in DETR's reference implementation, and become normalized (cx, cy, w, h)
only at the end (`to_normalized_cxcywh`). Every random choice is made up front by
`sample_geometry` from a stateless seed, so that a pipeline is reproducible whatever its
parallelism, and so that the output size of an example is known before any pixel is touched
(the batching step picks the example's bucket from it).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The geometric part of DETR's train or eval transform.

  Attributes:
    scales: shorter-side sizes, one drawn uniformly per image (one value for eval).
    max_size: bound on the longer side after the final resize.
    flip: random horizontal flip with probability 1/2.
    crop_resize_scales: if non-empty, with probability 1/2 the image is instead resized to
      one of these shorter sides (no max size), randomly cropped to a height and a width
      each drawn from [crop_min_size, crop_max_size], then resized as above.
    crop_min_size: smallest crop side.
    crop_max_size: largest crop side.
  """

  scales: tuple[int, ...]
  max_size: int
  flip: bool = False
  crop_resize_scales: tuple[int, ...] = ()
  crop_min_size: int = 0
  crop_max_size: int = 0

  @property
  def max_output_shape(self) -> tuple[int, int]:
    """(shorter, longer) side bounds of the output, up to DETR's rounding of one pixel."""
    return max(self.scales), self.max_size


def resized_shape(height, width, scale, max_size: int | None = None):
  """DETR's `get_size_with_aspect_ratio`: shorter side to `scale`, longer side <= max_size.

  Elementwise over tensors, with the reference's float64 arithmetic and rounding (including
  Python's round-half-to-even, which `tf.round` shares), so sizes match it to the pixel.

  Returns:
    (new_height, new_width) as int32 tensors.
  """
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  s = tf.cast(scale, tf.float64)
  if max_size is not None:
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    s = tf.where(long / short * s > max_size, tf.round(max_size * short / long), s)
  portrait = w < h
  new_h = tf.where(portrait, tf.floor(s * h / w), s)
  new_w = tf.where(portrait, s, tf.floor(s * w / h))
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def _uniform_int(seed: tf.Tensor, low, high) -> tf.Tensor:
  """A uniform integer in [low, high], both ends included."""
  return tf.random.stateless_uniform(
      [], seed, minval=low, maxval=high + 1, dtype=tf.int32)


def _choice(seed: tf.Tensor, values: Sequence[int]) -> tf.Tensor:
  return tf.gather(tf.constant(values, tf.int32), _uniform_int(seed, 0, len(values) - 1))


def sample_geometry(height, width, seed: tf.Tensor, aug: Augmentation) -> dict[str, tf.Tensor]:
  """Draws DETR's random choices for one image of the given size.

  Args:
    height: original image height (int32 scalar tensor).
    width: original image width.
    seed: stateless seed, int32/int64 tensor of shape [2].
    aug: the transform.

  Returns:
    A dict: `flip` (bool), `crop` (bool: the resize-crop-resize branch), `pre_size` ([2]: the
    size before cropping), `window` ([4]: top, left, height, width of the crop in `pre_size`
    coordinates; the whole image when `crop` is False) and `size` ([2]: the output size).
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  seeds = tf.random.experimental.stateless_split(seed, 8)
  flip = tf.constant(False)
  if aug.flip:
    flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
  crop = tf.constant(False)
  pre_size = tf.stack([height, width])
  window = tf.stack([0, 0, height, width])
  if aug.crop_resize_scales:
    crop = tf.random.stateless_uniform([], seeds[1]) < 0.5
    pre_h, pre_w = resized_shape(height, width, _choice(seeds[2], aug.crop_resize_scales))
    # torchvision's randint(min_size, min(side, max_size)), kept valid for small images.
    crop_h = _uniform_int(seeds[3], tf.minimum(aug.crop_min_size, pre_h),
                          tf.minimum(pre_h, aug.crop_max_size))
    crop_w = _uniform_int(seeds[4], tf.minimum(aug.crop_min_size, pre_w),
                          tf.minimum(pre_w, aug.crop_max_size))
    top = _uniform_int(seeds[5], 0, pre_h - crop_h)
    left = _uniform_int(seeds[6], 0, pre_w - crop_w)
    pre_size = tf.where(crop, tf.stack([pre_h, pre_w]), pre_size)
    window = tf.where(crop, tf.stack([top, left, crop_h, crop_w]), window)
  out_h, out_w = resized_shape(window[2], window[3], _choice(seeds[7], aug.scales),
                               aug.max_size)
  return {'flip': flip, 'crop': crop, 'pre_size': pre_size, 'window': window,
          'size': tf.stack([out_h, out_w])}


def resize(image: tf.Tensor, boxes: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Resizes to `size` (h, w) with antialiased bilinear filtering (PIL's, which DETR uses).

  Returns the float32 image and the boxes scaled by the same factors. Antialiasing only
  changes shrinking, so enlarging takes TensorFlow's plain (faster) bilinear path.
  """
  size = tf.convert_to_tensor(size, tf.int32)
  old = tf.shape(image)[:2]
  image = tf.cond(tf.reduce_any(size < old),
                  lambda: tf.image.resize(image, size, antialias=True),
                  lambda: tf.image.resize(image, size))
  sy, sx = tf.unstack(tf.cast(size, tf.float32) / tf.cast(old, tf.float32))
  return image, boxes * tf.stack([sx, sy, sx, sy])


def hflip(image: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Mirrors the image left-right, and the boxes with it."""
  width = tf.cast(tf.shape(image)[1], boxes.dtype)
  x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
  return image[:, ::-1], tf.stack([width - x1, y0, width - x0, y1], axis=-1)


def clip_boxes(boxes: tf.Tensor, labels: tf.Tensor, height,
               width) -> tuple[tf.Tensor, tf.Tensor]:
  """Clips boxes to an image of the given size and drops those left with no area."""
  limit = tf.cast(tf.stack([width, height, width, height]), boxes.dtype)
  boxes = tf.clip_by_value(boxes, 0.0, limit)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)


def crop(image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor,
         window: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Crops to `window` (top, left, height, width); boxes are cut to it, empty ones dropped."""
  top, left, height, width = tf.unstack(window)
  image = image[top:top + height, left:left + width]
  offset = tf.cast(tf.stack([left, top, left, top]), boxes.dtype)
  boxes, labels = clip_boxes(boxes - offset, labels, height, width)
  return image, boxes, labels


def apply_geometry(image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor,
                   geometry: dict[str, tf.Tensor],
                   size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Applies the choices of `sample_geometry`, ending with a resize to `size`.

  `size` is normally `geometry['size']`; the batching step may pass a slightly rescaled one
  that fits the example's bucket better.
  """
  image, boxes = tf.cond(geometry['flip'], lambda: hflip(image, boxes), lambda: (image, boxes))

  def resize_and_crop():
    resized, scaled = resize(image, boxes, geometry['pre_size'])
    return crop(resized, scaled, labels, geometry['window'])

  image, boxes, labels = tf.cond(geometry['crop'], resize_and_crop,
                                 lambda: (tf.cast(image, tf.float32), boxes, labels))
  image, boxes = resize(image, boxes, size)
  return image, boxes, labels


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """Maps [0, 255] pixels to ImageNet-normalized float32 (DETR's ToTensor + Normalize)."""
  mean = tf.constant(IMAGENET_MEAN, tf.float32)
  std = tf.constant(IMAGENET_STD, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def to_normalized_cxcywh(boxes: tf.Tensor, height, width) -> tf.Tensor:
  """Absolute (x0, y0, x1, y1) -> (cx, cy, w, h) relative to an image of the given size."""
  x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
  w = tf.cast(width, boxes.dtype)
  h = tf.cast(height, boxes.dtype)
  return tf.stack([(x0 + x1) / (2 * w), (y0 + y1) / (2 * h), (x1 - x0) / w, (y1 - y0) / h],
                  axis=-1)


def boxes_to_original(boxes, orig_size) -> np.ndarray:
  """Normalized (cx, cy, w, h) boxes of a batch -> COCO (x, y, w, h) in original pixels.

  The evaluator's post-processing. Boxes are normalized to the resized, unpadded image
  (batch key `size`), which shows the whole original image when evaluating (no crop), so
  scaling by the original size (`orig_size`) alone inverts the eval transform; neither the
  resized size nor the padding enters.

  Args:
    boxes: [..., 4] normalized (cx, cy, w, h), e.g. [B, N, 4] predictions.
    orig_size: [..., 2] original (height, width), e.g. batch['orig_size'] of shape [B, 2];
      broadcast against the box dimension.

  Returns:
    float64 [..., 4] boxes (x, y, width, height) in original-image pixels.
  """
  boxes = np.asarray(boxes, np.float64)
  orig_size = np.asarray(orig_size, np.float64)
  if boxes.ndim == orig_size.ndim + 1:
    orig_size = orig_size[..., None, :]
  h, w = orig_size[..., 0], orig_size[..., 1]
  cx, cy, bw, bh = np.moveaxis(boxes, -1, 0)
  return np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h], axis=-1)
