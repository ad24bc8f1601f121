"""DETR head: position encoding, transformer, model, Hungarian matcher, losses, postprocessing."""
from qna_detr.detr.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                   elementwise_box_iou, elementwise_generalized_box_iou,
                                   generalized_box_iou)
from qna_detr.detr.losses import LossWeights, layer_losses, set_criterion
from qna_detr.detr.matcher import SOLVERS, HungarianMatcher, match_cost, solve_jax, solve_scipy
from qna_detr.detr.model import DETR, BoxHead
from qna_detr.detr.position_encoding import sine_position_encoding
from qna_detr.detr.postprocess import postprocess, to_coco_results
from qna_detr.detr.transformer import DecoderLayer, EncoderLayer, Transformer

__all__ = [
    'DETR', 'BoxHead', 'DecoderLayer', 'EncoderLayer', 'HungarianMatcher', 'LossWeights',
    'SOLVERS', 'Transformer', 'box_area', 'box_cxcywh_to_xyxy', 'box_iou', 'box_xyxy_to_cxcywh',
    'elementwise_box_iou', 'elementwise_generalized_box_iou', 'generalized_box_iou',
    'layer_losses', 'match_cost', 'postprocess', 'set_criterion', 'sine_position_encoding',
    'solve_jax', 'solve_scipy', 'to_coco_results',
]
