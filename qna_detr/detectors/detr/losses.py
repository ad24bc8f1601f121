"""DETR's set criterion: Hungarian-matched classification and box losses.

Every decoder layer is matched to the targets on its own, as in the reference DETR. The box
losses are normalized by the number of real target boxes in the whole global batch: under `jit`
on globally sharded arrays that is a plain sum, equal to what per-device losses normalized by
the all-reduced count and averaged over devices give.
"""
import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from qna_detr.detectors import box_ops

Matcher = Callable[[Mapping[str, jax.Array], Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the loss terms and of the no-object class in the cross entropy."""
  ce: float = 1.0
  bbox: float = 5.0
  giou: float = 2.0
  no_object: float = 0.1


def layer_losses(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
                 match: jax.Array, num_boxes: jax.Array,
                 no_object_weight: float) -> dict[str, jax.Array]:
  """Unweighted losses of one decoder layer given its matching.

  Args:
    outputs: 'pred_logits' `[B, Q, C + 1]`, 'pred_boxes' `[B, Q, 4]` cxcywh.
    targets: 'boxes' `[B, N, 4]` cxcywh and 'labels' `[B, N]` int; only matched entries are read.
    match: `[B, Q]` int, each query's target index or -1.
    num_boxes: positive scalar normalizing the box losses.
    no_object_weight: cross-entropy weight of the no-object class (the others weigh 1).

  Returns:
    'loss_ce': class-weighted mean cross entropy over all queries (sum of weighted terms over
    sum of weights); 'loss_bbox', 'loss_giou': L1 and 1 - GIoU summed over matched pairs,
    divided by `num_boxes`.
  """
  logits = outputs['pred_logits'].astype(jnp.float32)
  no_object = logits.shape[-1] - 1
  matched = match >= 0
  target_index = jnp.maximum(match, 0)
  target_labels = jnp.take_along_axis(targets['labels'], target_index, axis=1)
  target_classes = jnp.where(matched, target_labels, no_object)
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_prob, target_classes[..., None], axis=-1)[..., 0]
  class_weight = jnp.where(matched, 1.0, no_object_weight)
  loss_ce = (class_weight * nll).sum() / class_weight.sum()

  pred_boxes = outputs['pred_boxes'].astype(jnp.float32)
  target_boxes = jnp.take_along_axis(targets['boxes'].astype(jnp.float32),
                                     target_index[..., None], axis=1)
  l1 = jnp.abs(pred_boxes - target_boxes).sum(-1)
  giou = box_ops.elementwise_generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pred_boxes),
                                                 box_ops.box_cxcywh_to_xyxy(target_boxes))
  return {
      'loss_ce': loss_ce,
      'loss_bbox': jnp.where(matched, l1, 0).sum() / num_boxes,
      'loss_giou': jnp.where(matched, 1 - giou, 0).sum() / num_boxes,
  }


def set_criterion(outputs: Mapping, targets: Mapping[str, jax.Array], matcher: Matcher,
                  weights: LossWeights = LossWeights()) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DETR's training loss over the final and auxiliary decoder outputs.

  Args:
    outputs: the model's output: 'pred_logits', 'pred_boxes' and 'aux_outputs' (a list of
      dicts with the same two keys; may be empty or absent).
    targets: 'boxes' `[B, N, 4]` normalized cxcywh, 'labels' `[B, N]` int32 in [0, C),
      'box_mask' `[B, N]` bool (True = real box); the batch is the global one.
    matcher: `(layer_outputs, targets) -> [B, Q]` matched target index or -1, e.g. a
      `HungarianMatcher`.
    weights: loss weights.

  Returns:
    The weighted total over all layers, and the unweighted components: 'loss_ce', 'loss_bbox',
    'loss_giou' for the final layer and the same names suffixed `_0`, `_1`, ... for the
    auxiliary layers in order.
  """
  if targets['boxes'].shape[1] == 0:
    raise ValueError('targets must be padded to at least one box (got N=0)')
  num_boxes = jnp.maximum(targets['box_mask'].sum().astype(jnp.float32), 1.0)
  aux_outputs = outputs.get('aux_outputs', [])
  layers = [('', outputs)] + [(f'_{i}', aux) for i, aux in enumerate(aux_outputs)]
  term_weights = {'loss_ce': weights.ce, 'loss_bbox': weights.bbox, 'loss_giou': weights.giou}
  components = {}
  total = jnp.float32(0)
  for suffix, layer in layers:
    match = jax.lax.stop_gradient(matcher(layer, targets))
    for name, value in layer_losses(layer, targets, match, num_boxes, weights.no_object).items():
      components[name + suffix] = value
      total = total + term_weights[name] * value
  return total, components
