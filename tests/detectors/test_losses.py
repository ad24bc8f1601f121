"""The set criterion against losses computed by hand in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.detectors.detr.losses import LossWeights, set_criterion
from qna_detr.detectors.matcher import SOLVERS, HungarianMatcher

NO_OBJECT = 3  # 3 classes + no-object


def reference_giou(a: np.ndarray, b: np.ndarray) -> float:
  """GIoU of two cxcywh boxes, straight from the definition."""
  ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
  bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
  inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
  union = a[2] * a[3] + b[2] * b[3] - inter
  hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
  return inter / union - (hull - union) / hull


def reference_losses(logits, boxes, targets, match, num_boxes, no_object_weight=0.1):
  """DETR's per-layer losses for an explicit matching, one query at a time."""
  weighted_nll = weights = l1 = giou = 0.0
  for b in range(logits.shape[0]):
    for q in range(logits.shape[1]):
      t = match[b][q]
      target_class = targets['labels'][b, t] if t >= 0 else NO_OBJECT
      weight = 1.0 if t >= 0 else no_object_weight
      log_prob = logits[b, q] - np.log(np.exp(logits[b, q]).sum())
      weighted_nll += -weight * log_prob[target_class]
      weights += weight
      if t >= 0:
        l1 += np.abs(boxes[b, q] - targets['boxes'][b, t]).sum()
        giou += 1 - reference_giou(boxes[b, q], targets['boxes'][b, t])
  return {'loss_ce': weighted_nll / weights, 'loss_bbox': l1 / num_boxes,
          'loss_giou': giou / num_boxes}


# Image 0 has one real box (and one padding slot); image 1 has two: three boxes in the batch.
TARGETS = {
    'boxes': np.array([[[0.5, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]],
                       [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.4]]], np.float32),
    'labels': np.array([[1, 0], [0, 2]], np.int32),
    'box_mask': np.array([[True, False], [True, True]]),
}
FAR = [0.1, 0.9, 0.1, 0.1]
# Boxes near one target each make the optimal matching obvious; the two layers differ.
FINAL = {
    'pred_logits': np.array([[[0.2, 1.0, -0.5, 0.3], [0.0, 0.1, 0.2, 1.5]],
                             [[-1.0, 0.4, 0.9, 0.0], [1.2, -0.3, 0.1, 0.5]]], np.float32),
    'pred_boxes': np.array([[[0.52, 0.5, 0.2, 0.2], FAR],
                            [[0.68, 0.62, 0.2, 0.4], [0.3, 0.28, 0.22, 0.2]]], np.float32),
}
FINAL_MATCH = [[0, -1], [1, 0]]
AUX = {
    'pred_logits': np.array([[[0.5, -0.2, 0.0, 0.7], [0.3, 0.8, -0.1, 0.0]],
                             [[0.9, 0.0, -0.4, 0.2], [0.1, 0.2, 1.1, -0.3]]], np.float32),
    'pred_boxes': np.array([[FAR, [0.45, 0.55, 0.25, 0.2]],
                            [[0.33, 0.3, 0.2, 0.25], [0.75, 0.6, 0.2, 0.3]]], np.float32),
}
AUX_MATCH = [[-1, 0], [0, 1]]


def expected_components() -> dict[str, float]:
  final = reference_losses(FINAL['pred_logits'], FINAL['pred_boxes'], TARGETS, FINAL_MATCH, 3)
  aux = reference_losses(AUX['pred_logits'], AUX['pred_boxes'], TARGETS, AUX_MATCH, 3)
  return {**final, **{f'{name}_0': value for name, value in aux.items()}}


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_losses_match_hand_computation(solver):
  outputs = {**FINAL, 'aux_outputs': [AUX]}
  criterion = jax.jit(lambda o, t: set_criterion(o, t, HungarianMatcher(solver=solver)))
  total, components = criterion(outputs, TARGETS)
  expected = expected_components()
  assert set(components) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(components[name], value, rtol=1e-5, err_msg=name)
  expected_total = sum(value * {'ce': 1, 'bbox': 5, 'giou': 2}[name.split('_')[1]]
                       for name, value in expected.items())
  np.testing.assert_allclose(total, expected_total, rtol=1e-5)


def test_weights_are_configurable():
  weights = LossWeights(ce=2.0, bbox=0.0, giou=1.0, no_object=0.5)
  total, components = set_criterion(FINAL, TARGETS, HungarianMatcher(), weights)
  final = reference_losses(FINAL['pred_logits'], FINAL['pred_boxes'], TARGETS, FINAL_MATCH, 3,
                           no_object_weight=0.5)
  np.testing.assert_allclose(components['loss_ce'], final['loss_ce'], rtol=1e-5)
  np.testing.assert_allclose(total, 2 * final['loss_ce'] + final['loss_giou'], rtol=1e-5)


def test_no_boxes_anywhere():
  targets = {**TARGETS, 'box_mask': np.zeros((2, 2), bool)}
  _, components = set_criterion(FINAL, targets, HungarianMatcher())
  logits = FINAL['pred_logits']
  no_object_nll = np.log(np.exp(logits).sum(-1)) - logits[..., NO_OBJECT]
  np.testing.assert_allclose(components['loss_ce'], no_object_nll.mean(), rtol=1e-5)
  assert components['loss_bbox'] == 0 and components['loss_giou'] == 0


def test_gradients_are_finite_and_skip_unmatched_boxes():
  outputs = {k: jnp.asarray(v) for k, v in FINAL.items()}
  grads = jax.grad(lambda o: set_criterion(o, TARGETS, HungarianMatcher())[0])(outputs)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(grads['pred_boxes'][0, 1], 0)  # query 1 of image 0: unmatched
  assert np.abs(grads['pred_boxes'][1]).min(-1).max() > 0


def test_rejects_targets_without_box_slots():
  targets = {'boxes': np.zeros((2, 0, 4)), 'labels': np.zeros((2, 0), np.int32),
             'box_mask': np.zeros((2, 0), bool)}
  with pytest.raises(ValueError, match='N=0'):
    set_criterion(FINAL, targets, HungarianMatcher())
