"""The seam between a detector and the machinery that trains, evaluates, runs and exports it.

`DetectorDef` holds all that machinery needs of a detector: the flax module, its loss (the
matching included) and its post-processing. Training, evaluation, inference, export and the
feature cache take one and import no detector module, so a new detector is one module, one
registry entry (`qna_detr.detectors.register`) and one config.
"""
from __future__ import annotations

import dataclasses
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
  """Stands in for a backbone: its 'images' are feature maps already computed."""

  @nn.compact
  def __call__(self, features: Array, padding_mask: Array, *, train: bool) -> list[FeatureMap]:
    del train
    return [FeatureMap(features, padding_mask)]


@dataclasses.dataclass(frozen=True)
class DetectorDef:
  """A detector as the rest of the project sees it.

  Attributes:
    module: called as `module.apply({'params': p}, images [B, H, W, 3], padding_mask
      [B, H, W], train=...)`; its backbone is the attribute `backbone` (parameters under
      'backbone'), of whose pyramid it reads level `feature_level`.
    loss: the training loss of the module's outputs against a batch's targets.
    postprocess: outputs -> scored detections in original-image pixels.
    num_classes: object classes (labels 0..num_classes - 1).
    target_keys: the batch entries `loss` reads besides the images.
    frozen: whether a parameter (its path in the module's tree) stays fixed in training
      whatever the optimizer settings (e.g. a ResNet's batch-norm).
  """
  module: nn.Module
  loss: Loss
  postprocess: PostProcess
  num_classes: int
  target_keys: tuple[str, ...] = ('boxes', 'labels', 'box_mask')
  frozen: Callable[[tuple[str, ...]], bool] = lambda path: False

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """Every batch entry a train step reads."""
    return IMAGE_KEYS + self.target_keys

  @property
  def feature_level(self) -> int:
    return self.module.feature_level

  def init(self, key: Array, image_shape: Sequence[int]) -> Any:
    """Parameters for images of `image_shape` (H, W); shapes do not depend on it."""
    images = jnp.zeros((1, *image_shape, 3), jnp.float32)
    return self.module.init(key, images, jnp.zeros(images.shape[:3], bool), train=False)['params']

  def backbone_features(self, backbone_params: Any, images: Array,
                        padding_mask: Array) -> FeatureMap:
    """The feature map the module reads, by its backbone in inference mode."""
    pyramid = self.module.backbone.apply({'params': backbone_params}, images, padding_mask,
                                         train=False)
    return pyramid[self.feature_level]

  def on_features(self) -> DetectorDef:
    """The same detector reading `backbone_features` (as its 'images') instead of images."""
    module = self.module.clone(backbone=GivenFeatures(), feature_level=-1)
    return dataclasses.replace(self, module=module)

  def predict(self, params: Any, images: Array, padding_mask: Array, orig_sizes: Array,
              top_k: int) -> dict[str, Array]:
    """Post-processed detections of a batch, the module in inference mode."""
    outputs = self.module.apply({'params': params}, images, padding_mask, train=False)
    return self.postprocess(outputs, orig_sizes, top_k)
