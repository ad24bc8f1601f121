"""The detector 'detr': DETR over a registered backbone, with its matcher, loss and
post-processing.

Reads `config.model` (backbone and its own keys, num_queries, hidden_dim, num_heads,
num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, aux_loss,
position_at_input, feature_level, dtype), `config.matcher` (cost_class, cost_bbox, cost_giou,
solver) and `config.loss` (ce, bbox, giou, no_object).
"""
from typing import Any

from qna_detr import parallel
from qna_detr.backbones import base
from qna_detr.backbones import registry as backbones
from qna_detr.detectors import registry
from qna_detr.detectors.base import DetectorDef
from qna_detr.detectors.detr.losses import LossWeights, set_criterion
from qna_detr.detectors.detr.matcher import HungarianMatcher
from qna_detr.detectors.detr.model import DETR
from qna_detr.detectors.detr.postprocess import postprocess

TARGET_KEYS = ('boxes', 'labels', 'box_mask')


def build_module(model_config: Any, num_classes: int) -> DETR:
  """DETR over `model_config.backbone`; the backbone's params live under 'backbone'."""
  m = model_config
  return DETR(backbone=backbones.build(m), num_classes=num_classes, num_queries=m.num_queries,
              hidden_dim=m.hidden_dim, num_heads=m.num_heads,
              num_encoder_layers=m.num_encoder_layers, num_decoder_layers=m.num_decoder_layers,
              dim_feedforward=m.dim_feedforward, dropout=m.dropout,
              dtype=base.compute_dtype(m.dtype), aux_loss=m.aux_loss,
              position_at_input=m.position_at_input, feature_level=m.feature_level)


def build(config: Any, num_classes: int) -> DetectorDef:
  m = config.matcher
  matcher = HungarianMatcher(cost_class=m.cost_class, cost_bbox=m.cost_bbox,
                             cost_giou=m.cost_giou, solver=m.solver,
                             batch_axis=parallel.BATCH_AXIS)
  weights = LossWeights(**config.loss)
  backbone_frozen = backbones.get(config.model.backbone).frozen

  def loss(outputs, batch):
    return set_criterion(outputs, {k: batch[k] for k in TARGET_KEYS}, matcher, weights)

  def frozen(path: tuple[str, ...]) -> bool:
    return path[0] == 'backbone' and backbone_frozen(tuple(path[1:]))

  return DetectorDef(
      module=build_module(config.model, num_classes), loss=loss,
      postprocess=lambda outputs, sizes, top_k: postprocess(outputs, sizes, top_k=top_k),
      num_classes=num_classes, target_keys=TARGET_KEYS, frozen=frozen)


registry.register('detr', build)
