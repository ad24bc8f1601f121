"""The seam between a detector and the machinery that trains, evaluates, runs and exports it.

`DetectorDef` holds all that machinery needs of a detector: the flax module, the backbone
levels it reads, its loss (the matching included) and its post-processing. Training,
evaluation, inference, export and the feature cache take one and import no detector module,
so a new detector is one module that registers a builder (`qna_detr.detectors.register`) and
a config.

A detector module is called as `module(images, padding_mask, *, train[, targets])` and reads
the pyramid `backbone(images, padding_mask, train=...)` returns at the indices
`feature_levels`. On cached features (`on_features`) its backbone is `GivenFeatures` and its
'images' are those levels (a tuple of maps and a tuple of masks).
"""
from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qna_detr.backbones.base import FeatureMap

Array = jax.Array
Outputs = Any
# (outputs, orig_sizes [B, 2] (height, width), top_k) -> 'scores' [B, K], 'labels' [B, K] in
# [0, num_classes), 'boxes' [B, K, 4] COCO (x, y, width, height) in original pixels.
PostProcess = Callable[[Outputs, Array, int], dict[str, Array]]
# (outputs, batch) -> (scalar loss, {name: scalar}); the batch holds `target_keys`.
Loss = Callable[[Outputs, Mapping[str, Array]], tuple[Array, dict[str, Array]]]
IMAGE_KEYS = ('inputs', 'padding_mask')


class GivenFeatures(nn.Module):
  """Stands in for a backbone: its 'images' are the feature maps already computed."""

  @nn.compact
  def __call__(self, features: Sequence[Array], padding_mask: Sequence[Array], *,
               train: bool) -> list[FeatureMap]:
    del train
    return [FeatureMap(f, m) for f, m in zip(features, padding_mask, strict=True)]


def check_images(images: Any, padding_mask: Any) -> None:
  """Images [B, H, W, C] with a padding mask [B, H, W] (cached features, tuples, pass)."""
  if isinstance(images, (tuple, list)):
    return
  if images.ndim != 4 or padding_mask.shape != images.shape[:3]:
    raise ValueError(f'images must be [B, H, W, 3] and padding_mask [B, H, W]; got '
                     f'{images.shape} and {padding_mask.shape}')


def select_levels(pyramid: Sequence[FeatureMap], levels: Sequence[int]) -> list[FeatureMap]:
  """The pyramid's maps at `levels` (indices; -1 is the last), checked."""
  for level in levels:
    if not -len(pyramid) <= level < len(pyramid):
      raise ValueError(f'Feature level {level} is not one of the backbone\'s {len(pyramid)} '
                       'levels')
  return [pyramid[level] for level in levels]


def init_params(module: nn.Module, key: Array, image_shape: Sequence[int]) -> Any:
  """Parameters of a module called as `module(images, padding_mask, train=False)`, for
  images of `image_shape` (H, W); jitted (the init runs the forward pass once)."""
  return _jit_init(module, tuple(int(s) for s in image_shape))(key)


@functools.lru_cache(maxsize=16)
def _jit_init(module: nn.Module, image_shape: tuple[int, int]) -> Callable:
  def init(key):
    images = jnp.zeros((1, *image_shape, 3), jnp.float32)
    return module.init(key, images, jnp.zeros(images.shape[:3], bool), train=False)['params']
  return jax.jit(init)


def stream_key(rng: Array, name: str) -> Array:
  """The key of the named PRNG stream `name` of a step's key: 'dropout' is the key itself,
  any other stream a fold of its name's CRC-32 (the same in every run, resumed or not)."""
  return rng if name == 'dropout' else jax.random.fold_in(rng, zlib.crc32(name.encode()))


@dataclasses.dataclass(frozen=True)
class DetectorDef:
  """A detector as the rest of the project sees it.

  Attributes:
    module: called as `module.apply({'params': p}, images [B, H, W, 3], padding_mask
      [B, H, W], train=...)`; its backbone is the attribute `backbone` (parameters under
      'backbone'), of whose pyramid it reads the levels `feature_levels`.
    loss: the training loss of the module's outputs against a batch's targets.
    postprocess: outputs -> scored detections in original-image pixels.
    num_classes: object classes (labels 0..num_classes - 1).
    target_keys: the batch entries `loss` reads besides the images.
    frozen: whether a parameter (its path in the module's tree) stays fixed in training
      whatever the optimizer settings (e.g. a ResNet's batch-norm).
    rng_streams: the named PRNG streams the module draws from in training.
    reads_targets: the module itself reads the targets in training (`targets=`), e.g. to
      build denoising queries from the ground truth.
  """
  module: nn.Module
  loss: Loss
  postprocess: PostProcess
  num_classes: int
  target_keys: tuple[str, ...] = ('boxes', 'labels', 'box_mask')
  frozen: Callable[[tuple[str, ...]], bool] = lambda path: False
  rng_streams: tuple[str, ...] = ('dropout',)
  reads_targets: bool = False

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """Every batch entry a train step reads."""
    return IMAGE_KEYS + self.target_keys

  @property
  def feature_levels(self) -> tuple[int, ...]:
    return tuple(self.module.feature_levels)

  def init(self, key: Array, image_shape: Sequence[int]) -> Any:
    """Parameters for images of `image_shape` (H, W); shapes do not depend on it."""
    return init_params(self.module, key, image_shape)

  def abstract_params(self) -> Any:
    """The parameters' shapes and dtypes, computed without running anything (at a size that
    any detector's queries fit)."""
    return jax.eval_shape(lambda k: self.init(k, (256, 256)), jax.random.PRNGKey(0))

  def backbone_features(self, backbone_params: Any, images: Array,
                        padding_mask: Array) -> list[FeatureMap]:
    """The feature maps the module reads, by its backbone in inference mode."""
    pyramid = self.module.backbone.apply({'params': backbone_params}, images, padding_mask,
                                         train=False)
    return select_levels(pyramid, self.feature_levels)

  def on_features(self) -> DetectorDef:
    """The same detector reading `backbone_features` (as its 'images') instead of images."""
    module = self.module.clone(backbone=GivenFeatures(),
                               feature_levels=tuple(range(len(self.feature_levels))))
    return dataclasses.replace(self, module=module)

  def train_outputs(self, params: Any, batch: Mapping[str, Array], rng: Array) -> Outputs:
    """The module's outputs in training mode on a batch, its PRNG streams drawn from the
    step's key `rng`."""
    rngs = {name: stream_key(rng, name) for name in self.rng_streams}
    extra = {'targets': {k: batch[k] for k in self.target_keys}} if self.reads_targets else {}
    return self.module.apply({'params': params}, batch['inputs'], batch['padding_mask'],
                             train=True, rngs=rngs, **extra)

  def predict(self, params: Any, images: Array, padding_mask: Array, orig_sizes: Array,
              top_k: int) -> dict[str, Array]:
    """Post-processed detections of a batch, the module in inference mode."""
    outputs = self.module.apply({'params': params}, images, padding_mask, train=False)
    return self.postprocess(outputs, orig_sizes, top_k)
