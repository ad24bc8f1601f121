"""From DINO outputs to scored COCO detections: the top-K (query, class) pairs by sigmoid score,
as the reference's `PostProcess` (a query may give several detections of different classes)."""
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from qna_detr.detectors import box_ops


def postprocess(outputs: Mapping[str, jax.Array], orig_sizes: jax.Array, *,
                top_k: int) -> dict[str, jax.Array]:
  """'scores' [B, K], 'labels' [B, K] int32, 'boxes' [B, K, 4] COCO (x, y, width, height) in
  original pixels, best first, of 'pred_logits' [B, Q, C] and 'pred_boxes' [B, Q, 4]."""
  logits = outputs['pred_logits'].astype(jnp.float32)
  batch, num_queries, num_classes = logits.shape
  if not 1 <= top_k <= num_queries * num_classes:
    raise ValueError(f'top_k must be in [1, {num_queries} queries x {num_classes} classes], '
                     f'got {top_k}')
  scores, index = jax.lax.top_k(jax.nn.sigmoid(logits).reshape(batch, -1), top_k)
  query, labels = index // num_classes, (index % num_classes).astype(jnp.int32)
  height, width = jnp.moveaxis(orig_sizes.astype(jnp.float32), -1, 0)
  scale = jnp.stack([width, height, width, height], axis=-1)[:, None, :]
  xyxy = box_ops.box_cxcywh_to_xyxy(outputs['pred_boxes'].astype(jnp.float32))
  xyxy = jnp.take_along_axis(xyxy, query[..., None], axis=1) * scale
  boxes = jnp.concatenate([xyxy[..., :2], xyxy[..., 2:] - xyxy[..., :2]], axis=-1)
  return {'scores': scores, 'labels': labels, 'boxes': boxes}
