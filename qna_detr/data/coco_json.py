"""COCO-format instance annotation files: loading, validation and contiguous labels.

The model predicts contiguous labels 0..C-1 (no background class); COCO category ids are
arbitrary and sparse (1..90 for COCO's 80 classes). Labels follow increasing category id,
and `category_ids[label]` maps back for evaluation. The cleaned annotation file, crowd
annotations and images without annotations included, is the evaluation ground truth.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CocoImage:
  """One image and its training targets (crowd annotations left out)."""

  image_id: int
  file_name: str
  height: int
  width: int
  boxes: np.ndarray  # float32 [n, 4] absolute (x0, y0, x1, y1).
  labels: np.ndarray  # int32 [n] contiguous labels.


@dataclasses.dataclass(frozen=True)
class CocoAnnotations:
  """A parsed annotation file."""

  path: str
  images: list[CocoImage]
  category_ids: tuple[int, ...]
  class_names: tuple[str, ...]
  ground_truth: dict[str, Any]
  # 'image <id>: <why>' / 'annotation <id>: <why>' entries dropped by `skip_bad_examples`.
  skipped: list[str]

  def without_images(self, bad: dict[int, str]) -> CocoAnnotations:
    """Drops images (image id -> reason) from the examples and from the ground truth."""
    gt = dict(self.ground_truth)
    gt['images'] = [im for im in gt['images'] if im['id'] not in bad]
    gt['annotations'] = [a for a in gt['annotations'] if a['image_id'] not in bad]
    return dataclasses.replace(
        self, images=[im for im in self.images if im.image_id not in bad], ground_truth=gt,
        skipped=self.skipped + [f'image {i}: {why}' for i, why in bad.items()])


def load_json(path: str) -> dict[str, Any]:
  """Reads a COCO annotation file, with errors that name it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'COCO annotation file not found: {path}')
  try:
    with open(path, 'rb') as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'Unreadable COCO annotation file {path}: {e}') from e
  missing = [k for k in ('images', 'annotations', 'categories')
             if not isinstance(data, dict) or k not in data]
  if missing:
    raise ValueError(f'COCO annotation file {path} lacks the key(s) {missing}')
  return data


def _bbox_problem(bbox: Any) -> str | None:
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
    return f'bbox {bbox!r} is not [x, y, width, height]'
  if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
    return f'bbox {bbox!r} has a non-finite or non-numeric value'
  if bbox[2] < 0:
    return f'negative width {bbox[2]} in bbox {bbox!r}'
  if bbox[3] < 0:
    return f'negative height {bbox[3]} in bbox {bbox!r}'
  return None


def _outside(bbox: Any, image: dict[str, Any]) -> str | None:
  """Why a box has no pixel in its image, or None."""
  x, y, w, h = bbox
  if x >= image['width'] or y >= image['height'] or x + w <= 0 or y + h <= 0:
    if w > 0 and h > 0:
      return (f'bbox {list(bbox)} entirely outside its image ({image["width"]} x '
              f'{image["height"]})')
  return None


def _records(data: dict[str, Any], key: str, fields: tuple[str, ...], path: str) -> dict[int, dict]:
  """Checks the id-keyed records of `key` ('images' or 'categories') and indexes them."""
  out = {}
  for i, record in enumerate(data[key]):
    missing = [f for f in fields if f not in record]
    if missing:
      raise ValueError(f'{path}: {key}[{i}] (id {record.get("id")}) lacks {missing}')
    if record['id'] in out:
      raise ValueError(f'{path}: duplicate id {record["id"]} in {key}')
    out[record['id']] = record
  return out


def parse(data: dict[str, Any], path: str, *, skip_bad_examples: bool) -> CocoAnnotations:
  """Validates an annotation dict (as read from `path`) and builds the training targets.

  Raises:
    ValueError: naming the annotation id, for an unknown image or category id, a bad bbox
      (negative width or height, non-finite, or entirely outside its image) or an id used
      before, unless `skip_bad_examples`, in which case such annotations are dropped (from
      the ground truth too), counted and logged.
  """
  images = _records(data, 'images', ('id', 'file_name', 'height', 'width'), path)
  categories = _records(data, 'categories', ('id', 'name'), path)
  category_ids = tuple(sorted(categories))
  label_of = {cid: label for label, cid in enumerate(category_ids)}

  kept, bad, seen = [], [], set()
  for i, ann in enumerate(data['annotations']):
    missing = [f for f in ('id', 'image_id', 'category_id', 'bbox') if f not in ann]
    if missing:
      raise ValueError(f'{path}: annotations[{i}] (id {ann.get("id")}) lacks {missing}')
    if ann['id'] in seen:
      problem = f'an id used by an earlier annotation (annotations[{i}])'
    elif ann['image_id'] not in images:
      problem = f'unknown image id {ann["image_id"]}'
    elif ann['category_id'] not in categories:
      problem = f'unknown category id {ann["category_id"]}'
    else:
      problem = _bbox_problem(ann['bbox']) or _outside(ann['bbox'], images[ann['image_id']])
    seen.add(ann['id'])
    if problem is None:
      x, y, w, h = ann['bbox']
      kept.append({**ann, 'iscrowd': int(ann.get('iscrowd', 0)), 'area': ann.get('area', w * h)})
    elif skip_bad_examples:
      bad.append(f'annotation {ann["id"]}: {problem}')
    else:
      raise ValueError(f'{path}: annotation {ann["id"]} has {problem}')

  targets = {image_id: ([], []) for image_id in images}
  num_empty = 0
  for ann in kept:
    if ann['iscrowd']:
      continue
    x, y, w, h = ann['bbox']
    num_empty += w == 0 or h == 0
    boxes, labels = targets[ann['image_id']]
    boxes.append((x, y, x + w, y + h))
    labels.append(label_of[ann['category_id']])
  if num_empty:
    logger.warning('%s: %d annotations have zero width or height; they stay in the ground '
                    'truth and are left out of the training targets.', path, num_empty)

  examples = [
      CocoImage(image_id=image_id, file_name=im['file_name'], height=int(im['height']),
                width=int(im['width']),
                boxes=np.asarray(targets[image_id][0], np.float32).reshape(-1, 4),
                labels=np.asarray(targets[image_id][1], np.int32))
      for image_id, im in images.items()
  ]
  ground_truth = {**data, 'annotations': kept}
  return CocoAnnotations(
      path=path, images=examples, category_ids=category_ids,
      class_names=tuple(categories[c]['name'] for c in category_ids),
      ground_truth=ground_truth, skipped=bad)
