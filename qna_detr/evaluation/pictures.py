"""A few validation images with their true and predicted boxes, for TensorBoard."""
from collections.abc import Sequence
import math

import numpy as np
from PIL import Image

from qna_detr.data.pipeline import DetectionDataset
from qna_detr.visualization import drawing
from qna_detr.visualization import inputs

TRUE_BOX_COLOUR = (255, 255, 255)


def validation_pictures(dataset: DetectionDataset, detections: Sequence[dict],
                        count: int = 4, threshold: float = 0.5,
                        min_side: int = 256) -> list[np.ndarray]:
  """[H, W, 3] uint8 pictures of the split's first `count` images: true boxes in white, and
  the detections (COCO results, original pixels) scoring >= `threshold` in their class's
  colour, captioned 'class score'; enlarged (integer factors) to `min_side` pixels."""
  truth = dataset.coco_ground_truth()
  names = {c['id']: c['name'] for c in truth['categories']}
  label = {c: i for i, c in enumerate(dataset.category_ids)}
  pictures = []
  for example in inputs.from_split(dataset, count):
    image_id = int(example.name)
    factor = max(1, math.ceil(min_side / max(1, min(example.orig_size))))
    picture = example.picture.resize((example.picture.width * factor,
                                      example.picture.height * factor), Image.Resampling.NEAREST)
    true = [a for a in truth['annotations'] if a['image_id'] == image_id]
    picture = drawing.draw_boxes(picture, np.array([a['bbox'] for a in true]) * factor,
                                 [''] * len(true), [TRUE_BOX_COLOUR] * len(true))
    found = [d for d in detections if d['image_id'] == image_id and d['score'] >= threshold]
    picture = drawing.draw_boxes(
        picture, np.array([d['bbox'] for d in found]) * factor,
        [f'{names[d["category_id"]]} {d["score"]:.2f}' for d in found],
        [drawing.class_colour(label[d['category_id']]) for d in found])
    pictures.append(np.asarray(picture))
  return pictures
