"""The evaluation wrapper against situations whose COCO metrics are known by construction."""
import json

import numpy as np
import pytest

from qna_detr.evaluation import coco_eval


def _ground_truth():
  images = [{'id': i, 'width': 200, 'height': 100, 'file_name': f'{i}.png'} for i in (3, 8)]
  boxes = [(3, 44, [10, 10, 60, 40]), (3, 64, [100, 20, 50, 50]), (8, 44, [5, 5, 90, 90])]
  annotations = [{'id': n + 1, 'image_id': i, 'category_id': c, 'bbox': b, 'area': b[2] * b[3],
                  'iscrowd': 0} for n, (i, c, b) in enumerate(boxes)]
  categories = [{'id': 44, 'name': 'bottle'}, {'id': 64, 'name': 'potted plant'}]
  return {'images': images, 'annotations': annotations, 'categories': categories}


def _as_detections(gt, score=0.9):
  return [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'],
           'score': score} for a in gt['annotations']]


def test_perfect_detections_score_one():
  gt = _ground_truth()
  metrics, per_category, summary = coco_eval.evaluate(gt, _as_detections(gt))
  assert list(metrics) == list(coco_eval.METRIC_NAMES)
  for name in ('AP', 'AP50', 'AP75', 'AR1', 'AR10', 'AR100'):
    assert metrics[name] == pytest.approx(1.0)
  assert per_category == {'bottle': pytest.approx(1.0), 'potted plant': pytest.approx(1.0)}
  assert summary.count('Average Precision') == 6 and summary.count('Average Recall') == 6


def test_one_class_wrong_halves_ap():
  """Bottles perfect, plants shifted off their box (IoU 0): AP is the mean over classes."""
  gt = _ground_truth()
  detections = _as_detections(gt)
  plant = next(d for d in detections if d['category_id'] == 64)
  plant['bbox'] = [0, 60, 20, 20]
  metrics, per_category, _ = coco_eval.evaluate(gt, detections)
  assert per_category['bottle'] == pytest.approx(1.0)
  assert per_category['potted plant'] == pytest.approx(0.0)
  assert metrics['AP'] == pytest.approx(0.5)


def test_no_detections_and_unknown_categories():
  gt = _ground_truth()
  metrics, _, _ = coco_eval.evaluate(gt, [])
  assert all(v == 0.0 for v in metrics.values())
  bad = _as_detections(gt)
  bad[0]['category_id'] = 7
  with pytest.raises(ValueError, match=r'\[7\]'):
    coco_eval.evaluate(gt, bad)


def test_results_files(tmp_path):
  gt = _ground_truth()
  detections = _as_detections(gt)
  detections[0]['score'] = np.float32(0.5)
  metrics, per_category, _ = coco_eval.evaluate(gt, detections)
  coco_eval.write_results(str(tmp_path), metrics, per_category, detections)
  written = json.loads((tmp_path / 'metrics.json').read_text())
  # A metric pycocotools cannot compute (-1: no ground truth in its range) is kept, with a note.
  missing = [k for k, v in metrics.items() if v == -1]
  assert missing and written.pop('note').startswith(f'-1 ({", ".join(missing)}): pycocotools')
  assert written == pytest.approx(metrics)
  written = json.loads((tmp_path / 'detections.json').read_text())
  assert written[0]['score'] == pytest.approx(0.5) and len(written) == 3
  assert 'potted plant' in (tmp_path / 'per_category_ap.txt').read_text()
