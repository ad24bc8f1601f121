"""Box conversions and (generalized) IoU.

Boxes are `[..., 4]` arrays, either `(cx, cy, w, h)` or `(x0, y0, x1, y1)`. Every function
broadcasts over leading axes; the pairwise forms insert the pair axes themselves. Divisions are
guarded so that degenerate boxes (zero width or height, or two identical points) give finite
values and finite gradients instead of 0/0.
"""
import jax
import jax.numpy as jnp

# Smallest area a denominator may take: far below any real box (normalized COCO boxes are
# >= 1e-6 in area) and far above float32's underflow.
_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """(x0, y0, x1, y1) -> (cx, cy, w, h)."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
  """Area of xyxy boxes; inverted boxes count as empty."""
  return (jnp.maximum(boxes[..., 2] - boxes[..., 0], 0) *
          jnp.maximum(boxes[..., 3] - boxes[..., 1], 0))


def _iou_and_union(boxes1: jax.Array, boxes2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Elementwise IoU and union area of broadcastable xyxy boxes."""
  top_left = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.maximum(bottom_right - top_left, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(boxes1) + box_area(boxes2) - inter
  return inter / jnp.maximum(union, _EPS), union


def elementwise_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """IoU of broadcastable xyxy boxes `[..., 4]` -> `[...]`."""
  return _iou_and_union(boxes1, boxes2)[0]


def elementwise_generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Generalized IoU (Rezatofighi et al. 2019) of broadcastable xyxy boxes, in [-1, 1].

  Unlike IoU it keeps a gradient for disjoint boxes: it subtracts the fraction of the smallest
  enclosing box that the union leaves empty.
  """
  iou, union = _iou_and_union(boxes1, boxes2)
  top_left = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.maximum(bottom_right - top_left, 0)
  enclosing = wh[..., 0] * wh[..., 1]
  return iou - (enclosing - union) / jnp.maximum(enclosing, _EPS)


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise IoU: xyxy `[..., N, 4]` and `[..., M, 4]` -> `[..., N, M]`."""
  return elementwise_box_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])


def generalized_box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise generalized IoU: xyxy `[..., N, 4]` and `[..., M, 4]` -> `[..., N, M]`."""
  return elementwise_generalized_box_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])
