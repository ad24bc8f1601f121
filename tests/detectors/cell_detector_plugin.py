"""A detector registered from outside the project: one prediction per feature-map cell, with a
config key of its own (`config.model.cell_box_scale`) that the generic code has never seen.

Imported through `config.imports = ('cell_detector_plugin',)` with this folder on PYTHONPATH.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from qna_detr import detectors
from qna_detr import parallel
from qna_detr.backbones import registry as backbones
from qna_detr.detectors.detr.losses import LossWeights, set_criterion
from qna_detr.detectors.detr.postprocess import postprocess
from qna_detr.detectors.matcher import HungarianMatcher

NAME = 'cell_detector'


class CellDetector(nn.Module):
  """Class logits and a box from linear heads on every cell of one feature map."""
  backbone: nn.Module
  num_classes: int
  box_scale: float
  feature_levels: tuple[int, ...] = (-1,)

  @nn.compact
  def __call__(self, images, padding_mask, *, train):
    level, = detectors.select_levels(self.backbone(images, padding_mask, train=train),
                                     self.feature_levels)
    tokens = level.features.reshape(level.features.shape[0], -1, level.features.shape[-1])
    logits = nn.Dense(self.num_classes + 1, name='classes')(tokens).astype(jnp.float32)
    boxes = nn.Dense(4, name='boxes')(tokens).astype(jnp.float32)
    return {'pred_logits': logits, 'pred_boxes': jax.nn.sigmoid(self.box_scale * boxes)}


def check(config):
  if config.model.cell_box_scale <= 0:
    raise ValueError(f'config.model.cell_box_scale={config.model.cell_box_scale} must be > 0.')


def build(config, num_classes):
  matcher = HungarianMatcher(batch_axis=parallel.BATCH_AXIS)
  return detectors.DetectorDef(
      module=CellDetector(backbones.build(config.model), num_classes,
                          config.model.cell_box_scale),
      loss=lambda outputs, batch: set_criterion(
          outputs, {k: batch[k] for k in ('boxes', 'labels', 'box_mask')}, matcher,
          LossWeights()),
      postprocess=lambda outputs, sizes, top_k: postprocess(outputs, sizes, top_k=top_k),
      num_classes=num_classes)


if NAME not in detectors.names():
  detectors.register(NAME, build, check)
