"""The detector 'dino': DINO over a registered backbone's pyramid, with its focal matcher,
criterion and top-K post-processing.

Reads `config.model` (backbone and its own keys, feature_levels, num_feature_levels,
hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
enc_points, dec_points, num_queries, two_stage, box_refinement, look_forward_twice,
dn_number, dn_label_noise, dn_box_noise, pe_temperature, deformable_attention, dtype),
`config.matcher` (cost_class, cost_bbox, cost_giou, solver) and `config.loss` (ce, bbox, giou,
focal_alpha, interm).
"""
from typing import Any

from qna_detr import parallel
from qna_detr.backbones import base
from qna_detr.backbones import registry as backbones
from qna_detr.detectors import registry
from qna_detr.detectors.base import DetectorDef
from qna_detr.detectors.dino import losses
from qna_detr.detectors.dino.model import DINO, DN_STREAM
from qna_detr.detectors.dino.postprocess import postprocess
from qna_detr.detectors.matcher import SOLVERS, HungarianMatcher
from qna_detr.layers import deformable_attention

TARGET_KEYS = ('boxes', 'labels', 'box_mask')


def build_module(model_config: Any, num_classes: int) -> DINO:
  """DINO over `model_config.backbone`; the backbone's params live under 'backbone'."""
  m = model_config
  return DINO(
      backbone=backbones.build(m), num_classes=num_classes,
      feature_levels=tuple(m.feature_levels), num_feature_levels=m.num_feature_levels,
      hidden_dim=m.hidden_dim, num_heads=m.num_heads, num_encoder_layers=m.num_encoder_layers,
      num_decoder_layers=m.num_decoder_layers, dim_feedforward=m.dim_feedforward,
      dropout=m.dropout, enc_points=m.enc_points, dec_points=m.dec_points,
      num_queries=m.num_queries, two_stage=m.two_stage, box_refinement=m.box_refinement,
      look_forward_twice=m.look_forward_twice, dn_number=m.dn_number,
      dn_label_noise=m.dn_label_noise, dn_box_noise=m.dn_box_noise,
      pe_temperature=m.pe_temperature, dtype=base.compute_dtype(m.dtype),
      attention_implementation=m.deformable_attention)


def check(config: Any) -> None:
  """The keys DINO reads that a run cannot start with, named."""
  m = config.model
  base.compute_dtype(m.dtype)
  levels = len(base.pyramid_levels(backbones.build(m)))
  chosen = [lvl % levels if -levels <= lvl < levels else None for lvl in m.feature_levels]
  if not chosen or None in chosen or chosen != sorted(set(chosen)):
    raise ValueError(f'config.model.feature_levels={tuple(m.feature_levels)} must name '
                     f'distinct levels of the backbone\'s {levels}, by increasing stride.')
  if m.num_feature_levels < len(chosen):
    raise ValueError(f'config.model.num_feature_levels={m.num_feature_levels} is below the '
                     f'{len(chosen)} levels of config.model.feature_levels.')
  if m.hidden_dim % 32 or m.hidden_dim % m.num_heads:
    raise ValueError(f'config.model.hidden_dim={m.hidden_dim} must be a multiple of 32 (the '
                     f'GroupNorm groups) and of config.model.num_heads={m.num_heads}.')
  if m.num_decoder_layers < 1:
    raise ValueError(f'config.model.num_decoder_layers={m.num_decoder_layers} must be >= 1.')
  if m.deformable_attention not in deformable_attention.IMPLEMENTATIONS:
    raise ValueError(f'config.model.deformable_attention={m.deformable_attention!r} is not '
                     f'one of {deformable_attention.IMPLEMENTATIONS}.')
  if m.dn_number < 0 or not 0 <= m.dn_label_noise <= 1 or m.dn_box_noise < 0:
    raise ValueError('config.model.dn_number, dn_label_noise and dn_box_noise must be >= 0 '
                     f'(dn_label_noise <= 1); got {m.dn_number}, {m.dn_label_noise}, '
                     f'{m.dn_box_noise}.')
  if m.look_forward_twice and not m.box_refinement:
    raise ValueError('config.model.look_forward_twice needs config.model.box_refinement: '
                     'without refinement there is no next box to look forward to.')
  if config.eval_top_k < 1:  # At most queries x classes (checked once classes are known).
    raise ValueError(f'config.eval_top_k={config.eval_top_k} must be >= 1.')
  if m.num_queries < config.dataset.max_boxes:
    raise ValueError(f'config.model.num_queries={m.num_queries} is below '
                     f'config.dataset.max_boxes={config.dataset.max_boxes}: every box of an '
                     'image must be matched to a query of its own.')
  if config.matcher.solver not in SOLVERS:
    raise ValueError(f'config.matcher.solver={config.matcher.solver!r} is not one of '
                     f'{sorted(SOLVERS)}.')


def build(config: Any, num_classes: int) -> DetectorDef:
  m = config.matcher
  weights = losses.LossWeights(**config.loss)
  matcher = HungarianMatcher(cost_class=m.cost_class, cost_bbox=m.cost_bbox,
                             cost_giou=m.cost_giou, solver=m.solver,
                             batch_axis=parallel.BATCH_AXIS, class_cost='focal',
                             focal_alpha=weights.focal_alpha)
  backbone_frozen = backbones.get(config.model.backbone).frozen

  def loss(outputs, batch):
    return losses.criterion(outputs, {k: batch[k] for k in TARGET_KEYS}, matcher, weights)

  def frozen(path: tuple[str, ...]) -> bool:
    return path[0] == 'backbone' and backbone_frozen(tuple(path[1:]))

  return DetectorDef(
      module=build_module(config.model, num_classes), loss=loss,
      postprocess=lambda outputs, sizes, top_k: postprocess(outputs, sizes, top_k=top_k),
      num_classes=num_classes, target_keys=TARGET_KEYS, frozen=frozen,
      rng_streams=('dropout', DN_STREAM), reads_targets=True)


registry.register('dino', build, check)
