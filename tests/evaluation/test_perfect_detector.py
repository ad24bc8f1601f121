"""Ground truth passed off as predictions through the real post-processing scores AP = 1.

The boxes come out of the input pipeline (resized, padded, normalized to the resized image)
and go back through `postprocess` and `to_coco_results` to original pixels; pycocotools is the
judge. Any error in the resize, the normalization or the back-mapping costs AP at IoU 0.95.
"""
import numpy as np
import pytest

from qna_detr.data import pipeline
from qna_detr.detectors.detr.postprocess import postprocess
from qna_detr.evaluation.coco_eval import to_coco_results
from qna_detr.evaluation import coco_eval


def _ground_truth_as_detections(dataset) -> list[dict]:
  detections = []
  for batch in dataset.iterator():
    classes = dataset.num_classes
    logits = np.full(batch['labels'].shape + (classes + 1,), -20.0, np.float32)
    np.put_along_axis(logits, batch['labels'][..., None], 20.0, axis=-1)
    logits[~batch['box_mask'], :] = -20.0
    logits[~batch['box_mask'], classes] = 20.0  # Padded slots predict "no object".
    outputs = {'pred_logits': logits, 'pred_boxes': batch['boxes']}
    result = {k: np.asarray(v) for k, v in postprocess(outputs, batch['orig_size']).items()}
    keep = batch['valid']
    detections += to_coco_results({k: v[keep] for k, v in result.items()},
                                  batch['image_id'][keep], dataset.category_ids)
  return detections


def _assert_perfect(dataset):
  detections = _ground_truth_as_detections(dataset)
  metrics, per_category, _ = coco_eval.evaluate(dataset.coco_ground_truth(), detections)
  assert metrics['AP'] == pytest.approx(1.0)
  assert metrics['AP75'] == pytest.approx(1.0) and metrics['AR100'] == pytest.approx(1.0)
  assert all(ap == pytest.approx(1.0) for ap in per_category.values() if not np.isnan(ap))


def test_toy_validation_split(toy_config):
  _assert_perfect(pipeline.build_dataset(toy_config, split='val', global_batch_size=4,
                                         shuffle_seed=0, train=False))


def test_real_coco_file_with_original_category_ids(real_folder, folder_config):
  """Two COCO val images (640x427, 352x230), categories 44 and 64, at DETR's eval size."""
  dataset = pipeline.build_dataset(folder_config(*real_folder), split='val',
                                   global_batch_size=2, shuffle_seed=0, train=False)
  assert dataset.category_ids == (44, 64)
  _assert_perfect(dataset)
