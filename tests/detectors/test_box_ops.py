"""Box conversions and (G)IoU against values computed by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.detectors import box_ops


def test_conversions_hand_values():
  cxcywh = jnp.array([0.5, 0.5, 0.2, 0.4])
  np.testing.assert_allclose(box_ops.box_cxcywh_to_xyxy(cxcywh), [0.4, 0.3, 0.6, 0.7], atol=1e-7)
  np.testing.assert_allclose(box_ops.box_xyxy_to_cxcywh(jnp.array([1., 2., 4., 8.])),
                             [2.5, 5., 3., 6.])


# (box1, box2, IoU, GIoU), xyxy; values worked out on paper.
CASES = [
    ((0, 0, 1, 1), (0, 0, 1, 1), 1.0, 1.0),  # identical
    ((0, 0, 1, 1), (2, 0, 3, 1), 0.0, -1 / 3),  # disjoint: hull 3, union 2
    ((0, 0, 1, 1), (1, 0, 2, 1), 0.0, 0.0),  # touching: hull == union
    ((0, 0, 4, 4), (1, 1, 3, 3), 0.25, 0.25),  # nested: hull == outer box
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7, 1 / 7 - 2 / 9),  # overlap 1, union 7, hull 9
    ((0, 0, 1, 1), (3, 3, 4, 4), 0.0, 2 / 16 - 1),  # far apart: hull 16, union 2
]


@pytest.mark.parametrize('box1,box2,iou,giou', CASES)
def test_iou_and_giou_hand_values(box1, box2, iou, giou):
  a, b = jnp.array(box1, jnp.float32), jnp.array(box2, jnp.float32)
  np.testing.assert_allclose(box_ops.elementwise_box_iou(a, b), iou, atol=1e-6)
  np.testing.assert_allclose(box_ops.elementwise_generalized_box_iou(a, b), giou, atol=1e-6)
  np.testing.assert_allclose(box_ops.elementwise_generalized_box_iou(b, a), giou, atol=1e-6)


def test_pairwise_matches_the_hand_table():
  boxes1 = jnp.array([c[0] for c in CASES], jnp.float32)
  boxes2 = jnp.array([c[1] for c in CASES], jnp.float32)
  iou = box_ops.box_iou(boxes1, boxes2)
  giou = box_ops.generalized_box_iou(boxes1, boxes2)
  assert iou.shape == giou.shape == (len(CASES), len(CASES))
  np.testing.assert_allclose(np.diag(iou), [c[2] for c in CASES], atol=1e-6)
  np.testing.assert_allclose(np.diag(giou), [c[3] for c in CASES], atol=1e-6)
  # Row 0 is the unit box at the origin; column 3 is (1, 1, 3, 3): disjoint but for a corner.
  np.testing.assert_allclose(giou[0, 3], 0 - (9 - 5) / 9, atol=1e-6)


def test_pairwise_batched_shapes():
  boxes1, boxes2 = jnp.zeros((2, 5, 4)), jnp.zeros((2, 3, 4))
  assert box_ops.generalized_box_iou(boxes1, boxes2).shape == (2, 5, 3)


def test_degenerate_boxes_are_finite_with_finite_gradients():
  point = jnp.array([0.5, 0.5, 0.5, 0.5])
  line = jnp.array([0.0, 0.2, 1.0, 0.2])
  for a, b in [(point, point), (point, line), (line, line), (jnp.zeros(4), point)]:
    value, grad = jax.value_and_grad(box_ops.elementwise_generalized_box_iou)(a, b)
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert -1 <= value <= 1
