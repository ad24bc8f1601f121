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
from qna_detr.detectors.matcher import SOLVERS, HungarianMatcher
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
              position_at_input=m.position_at_input, feature_levels=(m.feature_level,))


def check(config: Any) -> None:
  """The keys DETR reads that a run cannot start with, named."""
  m = config.model
  base.compute_dtype(m.dtype)
  if m.num_queries < config.dataset.max_boxes:
    raise ValueError(f'config.model.num_queries={m.num_queries} is below '
                     f'config.dataset.max_boxes={config.dataset.max_boxes}: every box of an '
                     'image must be matched to a query of its own.')
  if not 1 <= config.eval_top_k <= m.num_queries:
    raise ValueError(f'config.eval_top_k={config.eval_top_k} must be in [1, '
                     f'config.model.num_queries={m.num_queries}] (one detection per query).')
  if m.hidden_dim % m.num_heads or m.hidden_dim % 4:
    raise ValueError(f'config.model.hidden_dim={m.hidden_dim} must be a multiple of '
                     f'config.model.num_heads={m.num_heads} and of 4.')
  if config.matcher.solver not in SOLVERS:
    raise ValueError(f'config.matcher.solver={config.matcher.solver!r} is not one of '
                     f'{sorted(SOLVERS)}.')


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


registry.register('detr', build, check)
