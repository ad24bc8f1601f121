"""COCO box evaluation with pycocotools: the standard 12-number summary and per-category AP."""
import contextlib
import copy
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# pycocotools' stats[0..11], in order.
METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def _coco(ground_truth: dict) -> COCO:
  coco = COCO()
  coco.dataset = copy.deepcopy(ground_truth)
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def evaluate(ground_truth: dict, detections: Sequence[dict]) -> tuple[dict, dict, str]:
  """Evaluates COCO-format detections against a COCO-format ground truth.

  Returns (metrics keyed by METRIC_NAMES, AP per category name, pycocotools' printed summary).
  With no detections at all every metric is 0 (pycocotools itself refuses an empty result).
  """
  gt = _coco(ground_truth)
  names = {c['id']: c['name'] for c in ground_truth['categories']}
  if not detections:
    return ({k: 0.0 for k in METRIC_NAMES}, {n: 0.0 for n in names.values()},
            'no detections\n')
  known = set(names)
  unknown = {d['category_id'] for d in detections} - known
  if unknown:
    raise ValueError(f'detections use category ids {sorted(unknown)} that the ground truth '
                     f'does not define (known: {sorted(known)}).')
  summary = io.StringIO()
  with contextlib.redirect_stdout(summary):
    dt = gt.loadRes([dict(d) for d in detections])
    coco_eval = COCOeval(gt, dt, 'bbox')
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  metrics = {k: float(v) for k, v in zip(METRIC_NAMES, coco_eval.stats)}
  return metrics, _per_category_ap(coco_eval, names), _summary_lines(summary.getvalue())


def _summary_lines(text: str) -> str:
  """The 12 'Average Precision/Recall' lines, without pycocotools' progress chatter."""
  return ''.join(line + '\n' for line in text.splitlines() if line.startswith(' Average'))


def _per_category_ap(coco_eval: COCOeval, names: dict[int, str]) -> dict[str, float]:
  """AP@[.5:.95], all areas, 100 detections, of each category (NaN: no ground truth)."""
  precision = coco_eval.eval['precision']  # [IoU thresholds, recall, category, area, max dets]
  result = {}
  for k, cat_id in enumerate(coco_eval.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    result[names[cat_id]] = float(p.mean()) if p.size else float('nan')
  return result


def format_per_category(per_category: dict[str, float]) -> str:
  width = max([len(n) for n in per_category] + [8])
  lines = [f"{'category':<{width}}  AP"]
  lines += [f'{name:<{width}}  {ap:.3f}' for name, ap in per_category.items()]
  return '\n'.join(lines) + '\n'


def write_results(output_dir: str, metrics: dict, per_category: dict,
                  detections: Sequence[dict[str, Any]]) -> None:
  """metrics.json (pycocotools' values, with a note where one is its -1 for 'no ground truth
  in that range'), detections.json (COCO results format) and per_category_ap.txt."""
  os.makedirs(output_dir, exist_ok=True)
  missing = [k for k, v in metrics.items() if v == -1]
  if missing:
    metrics = {**metrics, 'note': f'-1 ({", ".join(missing)}): pycocotools found no ground '
                                  'truth in that range (e.g. no large objects)'}
  with open(os.path.join(output_dir, 'metrics.json'), 'w') as f:
    json.dump(metrics, f, indent=2)
  with open(os.path.join(output_dir, 'detections.json'), 'w') as f:
    json.dump([{k: _plain(v) for k, v in d.items()} for d in detections], f)
  with open(os.path.join(output_dir, 'per_category_ap.txt'), 'w') as f:
    f.write(format_per_category(per_category))


def _plain(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def to_coco_results(detections: Mapping[str, Any], image_ids: Sequence[int],
                    label_to_category_id: Sequence[int]) -> list[dict[str, Any]]:
  """Turns a detector's post-processed detections (on the host) into COCO result dicts.

  Args:
    detections: 'scores' `[B, K]`, 'labels' `[B, K]`, 'boxes' `[B, K, 4]` xywh.
    image_ids: the COCO image id of each of the B images.
    label_to_category_id: the COCO category id of each contiguous label.

  Returns:
    One `{'image_id', 'category_id', 'bbox', 'score'}` dict per detection, plain Python types.
  """
  scores, labels, boxes = (np.asarray(detections[k]) for k in ('scores', 'labels', 'boxes'))
  if len(image_ids) != scores.shape[0]:
    raise ValueError(f'image_ids has {len(image_ids)} entries for a batch of {scores.shape[0]}')
  category_ids = np.asarray(label_to_category_id)
  if labels.size and labels.max() >= len(category_ids):
    raise ValueError(f'label_to_category_id has {len(category_ids)} entries but a detection '
                     f'has label {labels.max()}')
  return [{'image_id': int(image_id), 'category_id': int(category_ids[label]),
           'bbox': [float(v) for v in box], 'score': float(score)}
          for image_id, image_scores, image_labels, image_boxes
          in zip(image_ids, scores, labels, boxes)
          for score, label, box in zip(image_scores, image_labels, image_boxes)]
