"""DINO's set criterion (IDEA-Research/DINO `SetCriterion`): sigmoid focal loss for classes, L1
and GIoU for boxes, on the last decoder layer, every other layer, the encoder's selection and
the denoising queries.

Matching queries are matched to the targets per layer with the focal matching cost; denoising
slots reconstruct their own ground-truth box (positives) or say "no object" (negatives and
padding), normalized by the boxes times the groups. The focal loss sums over queries and
classes, divided by the number of boxes of the global batch (`detr.losses` says why that
equals the reference's per-device normalization).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from qna_detr.detectors import box_ops

Array = jax.Array
Matcher = Callable[[Mapping[str, Array], Mapping[str, Array]], Array]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the loss terms (the reference's cls/bbox/giou coefficients), the focal
  loss's alpha, and the weight of the encoder selection's terms relative to the others."""
  ce: float = 1.0
  bbox: float = 5.0
  giou: float = 2.0
  focal_alpha: float = 0.25
  interm: float = 1.0


def sigmoid_focal_loss(logits: Array, targets: Array, alpha: float, gamma: float = 2.0
                       ) -> Array:
  """RetinaNet's focal loss of every logit (elementwise)."""
  prob = jax.nn.sigmoid(logits)
  ce = optax.sigmoid_binary_cross_entropy(logits, targets)
  p_t = prob * targets + (1 - prob) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


def layer_losses(outputs: Mapping[str, Array], targets: Mapping[str, Array], match: Array,
                 num_boxes: Array, alpha: float,
                 counted: Array | None = None) -> dict[str, Array]:
  """Unweighted losses of one layer's queries given their assignment.

  Args:
    outputs: 'pred_logits' [B, Q, C], 'pred_boxes' [B, Q, 4] cxcywh.
    targets: 'boxes' [B, N, 4], 'labels' [B, N].
    match: [B, Q] the target index of each query, or -1 ("no object").
    num_boxes: the normalizer.
    alpha: the focal loss's.
    counted: [B, Q] or [Q] bool, the queries the class loss reads (default all).
  """
  logits = outputs['pred_logits'].astype(jnp.float32)
  matched = match >= 0
  index = jnp.maximum(match, 0)
  labels = jnp.take_along_axis(targets['labels'], index, 1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1]) * matched[..., None]
  focal = sigmoid_focal_loss(logits, onehot, alpha)
  if counted is not None:
    focal = focal * jnp.broadcast_to(counted, match.shape)[..., None]
  pred = outputs['pred_boxes'].astype(jnp.float32)
  target = jnp.take_along_axis(targets['boxes'].astype(jnp.float32), index[..., None], 1)
  l1 = jnp.abs(pred - target).sum(-1)
  giou = box_ops.elementwise_generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pred),
                                                 box_ops.box_cxcywh_to_xyxy(target))
  return {'loss_ce': focal.sum() / num_boxes,
          'loss_bbox': jnp.where(matched, l1, 0).sum() / num_boxes,
          'loss_giou': jnp.where(matched, 1 - giou, 0).sum() / num_boxes}


def criterion(outputs: Mapping, targets: Mapping[str, Array], matcher: Matcher,
              weights: LossWeights = LossWeights()) -> tuple[Array, dict[str, Array]]:
  """DINO's training loss and its unweighted components: 'loss_ce', 'loss_bbox',
  'loss_giou' of the last layer, suffixed '_0', '_1', ... for the other layers, '_interm'
  for the encoder's selection, '_dn' (and '_dn_0', ...) for the denoising queries."""
  num_boxes = jnp.maximum(targets['box_mask'].sum().astype(jnp.float32), 1.0)
  terms = {'loss_ce': weights.ce, 'loss_bbox': weights.bbox, 'loss_giou': weights.giou}
  components, total = {}, jnp.float32(0)

  def add(suffix, layer, match, normalizer, scale=1.0, counted=None):
    nonlocal total
    for name, value in layer_losses(layer, targets, match, normalizer, weights.focal_alpha,
                                    counted).items():
      components[name + suffix] = value
      total = total + scale * terms[name] * value

  aux = outputs.get('aux_outputs', [])
  for suffix, layer in [('', outputs)] + [(f'_{i}', a) for i, a in enumerate(aux)]:
    add(suffix, layer, jax.lax.stop_gradient(matcher(layer, targets)), num_boxes)
  if 'interm_outputs' in outputs:
    layer = outputs['interm_outputs']
    add('_interm', layer, jax.lax.stop_gradient(matcher(layer, targets)), num_boxes,
        weights.interm)
  if 'dn_outputs' in outputs:
    dn = outputs['dn']
    dn_layers = outputs['dn_outputs']
    suffixes = ['_dn'] + [f'_dn_{i}' for i in range(len(dn_layers) - 1)]
    for suffix, layer in zip(suffixes, [dn_layers[-1]] + dn_layers[:-1]):
      add(suffix, layer, dn.target, num_boxes * dn.groups, counted=dn.exists)
  return total, components
