"""Post-processing on a hand-computed example."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.detectors.detr.postprocess import postprocess
from qna_detr.evaluation.coco_eval import to_coco_results

# One image, three queries, two classes + no-object; logits are log-probabilities.
PROBS = np.array([[[0.2, 0.7, 0.1],  # class 1 at 0.7
                   [0.1, 0.1, 0.8],  # mostly no-object: best real class 0 (first of a tie)
                   [0.6, 0.3, 0.1]]])  # class 0 at 0.6
BOXES = np.array([[[0.5, 0.5, 0.5, 0.25], [0.1, 0.2, 0.2, 0.4], [0.75, 0.5, 0.5, 1.0]]])
ORIG_SIZES = np.array([[100, 200]])  # height 100, width 200
# cxcywh * (w, h, w, h) -> xywh: e.g. (0.5, 0.5, 0.5, 0.25) -> x 100 - 50, y 50 - 12.5.
EXPECTED_BOXES = [[50.0, 37.5, 100.0, 25.0], [0.0, 0.0, 40.0, 40.0], [100.0, 0.0, 100.0, 100.0]]


def outputs():
  return {'pred_logits': jnp.log(jnp.asarray(PROBS, jnp.float32)),
          'pred_boxes': jnp.asarray(BOXES, jnp.float32)}


def test_scores_labels_and_boxes():
  result = jax.jit(postprocess)(outputs(), ORIG_SIZES)
  np.testing.assert_allclose(result['scores'], [[0.7, 0.1, 0.6]], rtol=1e-6)
  np.testing.assert_array_equal(result['labels'], [[1, 0, 0]])
  assert result['labels'].dtype == jnp.int32
  np.testing.assert_allclose(result['boxes'], [EXPECTED_BOXES], rtol=1e-6, atol=1e-5)


def test_top_k_keeps_the_best_queries_in_order():
  result = jax.jit(postprocess, static_argnames='top_k')(outputs(), ORIG_SIZES, top_k=2)
  np.testing.assert_allclose(result['scores'], [[0.7, 0.6]], rtol=1e-6)
  np.testing.assert_array_equal(result['labels'], [[1, 0]])
  np.testing.assert_allclose(result['boxes'], [[EXPECTED_BOXES[0], EXPECTED_BOXES[2]]],
                             rtol=1e-6, atol=1e-5)
  with pytest.raises(ValueError, match='top_k'):
    postprocess(outputs(), ORIG_SIZES, top_k=4)


def test_coco_results():
  detections = jax.device_get(postprocess(outputs(), ORIG_SIZES, top_k=2))
  results = to_coco_results(detections, image_ids=[42], label_to_category_id=[1, 90])
  assert len(results) == 2
  assert results[0] == {'image_id': 42, 'category_id': 90, 'bbox': pytest.approx(
      EXPECTED_BOXES[0], abs=1e-4), 'score': pytest.approx(0.7, rel=1e-6)}
  assert results[1]['category_id'] == 1 and type(results[1]['bbox'][0]) is float
  with pytest.raises(ValueError, match='label_to_category_id'):
    to_coco_results(detections, image_ids=[42], label_to_category_id=[1])
  with pytest.raises(ValueError, match='image_ids'):
    to_coco_results(detections, image_ids=[1, 2], label_to_category_id=[1, 90])
