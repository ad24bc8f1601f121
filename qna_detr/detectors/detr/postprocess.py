"""From DETR outputs to scored COCO detections.

Predicted boxes are normalized to the unpadded extent of the resized image; the resize maps the
whole original image onto that extent, so scaling by the original size alone gives original
image coordinates, whatever the resize and the padding were.
"""
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from qna_detr.detectors import box_ops


def postprocess(outputs: Mapping[str, jax.Array], orig_sizes: jax.Array, *,
                top_k: int | None = None) -> dict[str, jax.Array]:
  """Per query, the most likely real class, its probability and its box in pixels.

  Args:
    outputs: 'pred_logits' `[B, Q, C + 1]` (last = no object), 'pred_boxes' `[B, Q, 4]`
      normalized cxcywh.
    orig_sizes: `[B, 2]` (height, width) of the original images.
    top_k: keep only the `top_k` highest-scoring queries of each image, best first.

  Returns:
    'scores' `[B, K]` float32, 'labels' `[B, K]` int32 in [0, C), 'boxes' `[B, K, 4]` float32
    COCO (x, y, width, height) in original pixels; K = `top_k` or Q.
  """
  prob = jax.nn.softmax(outputs['pred_logits'].astype(jnp.float32), axis=-1)[..., :-1]
  scores, labels = prob.max(-1), prob.argmax(-1).astype(jnp.int32)
  height, width = jnp.moveaxis(orig_sizes.astype(jnp.float32), -1, 0)
  scale = jnp.stack([width, height, width, height], axis=-1)[:, None, :]
  xyxy = box_ops.box_cxcywh_to_xyxy(outputs['pred_boxes'].astype(jnp.float32)) * scale
  boxes = jnp.concatenate([xyxy[..., :2], xyxy[..., 2:] - xyxy[..., :2]], axis=-1)
  if top_k is not None:
    num_queries = scores.shape[1]
    if not 1 <= top_k <= num_queries:
      raise ValueError(f'top_k must be in [1, {num_queries}], got {top_k}')
    scores, order = jax.lax.top_k(scores, top_k)
    labels = jnp.take_along_axis(labels, order, axis=1)
    boxes = jnp.take_along_axis(boxes, order[..., None], axis=1)
  return {'scores': scores, 'labels': labels, 'boxes': boxes}
