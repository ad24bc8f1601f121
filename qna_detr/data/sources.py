"""Detection data sources: TFDS `coco/*` and COCO-format folders.

Every source yields, through `Source.load`, the same example structure:
  image     uint8 [h, w, 3]
  image_id  int64 []
  boxes     float32 [n, 4] absolute (x0, y0, x1, y1), crowd annotations left out
  labels    int32 [n] contiguous labels (`category_ids[label]` is the original id)
Its `elements` are light records (a path or the encoded bytes, and the annotations), so that
shuffling buffers stay small and images are decoded only after the shuffle.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from qna_detr.data import coco_json
from qna_detr.data import image_check

logger = logging.getLogger(__name__)

Example = dict[str, tf.Tensor]

# COCO's category ids of its 80 detection classes, in TFDS label order (by increasing id).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
    78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)
# Their names, as COCO's annotation files give them.
COCO_CLASS_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich',
    'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')


@dataclasses.dataclass(frozen=True)
class Source:
  """One split of a detection dataset, as read by one process."""

  elements: tf.data.Dataset  # This process's shard, in a fixed order.
  load: Callable[[dict[str, tf.Tensor]], Example]  # element -> example (see module doc).
  num_examples: int  # In the whole split, over all processes.
  category_ids: tuple[int, ...]
  class_names: tuple[str, ...]
  # Original (height, width) of up to n images of the whole split, the same in every process.
  image_sizes: Callable[[int], np.ndarray]
  ground_truth: Callable[[], dict[str, Any]]  # COCO-format dict of the whole split.


def _sample(sizes: np.ndarray, n: int) -> np.ndarray:
  if len(sizes) <= n:
    return sizes
  return sizes[np.sort(np.random.default_rng(0).choice(len(sizes), n, replace=False))]


# (annotation file, its mtime, image folder) -> {image id: problem}: a run builds the same
# split several times (its phases, evaluation, the feature cache) but decodes it once.
_CHECKED: dict[tuple[str, int, str], dict[int, str]] = {}


def _image_problems(annotations: coco_json.CocoAnnotations,
                    image_dir: str) -> dict[int, str]:
  key = (os.path.abspath(annotations.path), os.stat(annotations.path).st_mtime_ns,
         os.path.abspath(image_dir))
  if key not in _CHECKED:
    paths = [os.path.join(image_dir, im.file_name) for im in annotations.images]
    problems, _ = image_check.check(paths,
                                    [(im.height, im.width) for im in annotations.images])
    _CHECKED[key] = {im.image_id: f'{p}: {path}' for im, path, p
                     in zip(annotations.images, paths, problems) if p is not None}
  return _CHECKED[key]


def _check_image_files(annotations: coco_json.CocoAnnotations, image_dir: str,
                       skip_bad_examples: bool) -> coco_json.CocoAnnotations:
  """Decodes every image of the annotation file (`image_check`): missing, undecodable,
  corrupt or wrongly sized files are named, or skipped with `skip_bad_examples`."""
  bad = _image_problems(annotations, image_dir)
  if bad and not skip_bad_examples:
    listed = '\n  '.join(f'image {i}: {why}' for i, why in list(bad.items())[:20])
    more = f'\n  ... and {len(bad) - 20} more' if len(bad) > 20 else ''
    missing = all(p.startswith(image_check.MISSING) for p in bad.values())
    error = FileNotFoundError if missing else ValueError
    raise error(f'{len(bad)} bad image file(s) for {annotations.path} '
                f'(set config.dataset.skip_bad_examples to skip them):\n  {listed}{more}')
  return annotations.without_images(bad)


def coco_folder(json_path: str, image_dir: str, *, skip_bad_examples: bool,
                process_index: int, process_count: int) -> Source:
  """A COCO-format folder: an instances JSON file and the directory of its images.

  Bad examples (image files that are missing, undecodable, corrupt or of another size than
  the file says; annotations with an unknown image or category id, a negative box size, a box
  outside its image or a duplicate id) raise an error naming them, or, with
  `skip_bad_examples`, are left out of both the examples and the ground truth and are
  counted and listed in the log.
  """
  annotations = coco_json.parse(coco_json.load_json(json_path), json_path,
                                skip_bad_examples=skip_bad_examples)
  annotations = _check_image_files(annotations, image_dir, skip_bad_examples)
  if annotations.skipped:
    logger.warning('Skipped %d bad examples of %s:\n  %s', len(annotations.skipped),
                    json_path, '\n  '.join(annotations.skipped))
  images = annotations.images
  if not images:
    raise ValueError(f'No usable image in {json_path}')
  shard = images[process_index::process_count]
  elements = tf.data.Dataset.from_tensor_slices({
      'path': [os.path.join(image_dir, im.file_name) for im in shard],
      'image_id': np.array([im.image_id for im in shard], np.int64),
      'boxes': tf.RaggedTensor.from_row_lengths(
          np.concatenate([im.boxes for im in shard]), [len(im.boxes) for im in shard]),
      'labels': tf.RaggedTensor.from_row_lengths(
          np.concatenate([im.labels for im in shard]), [len(im.labels) for im in shard]),
  })

  def load(element: dict[str, tf.Tensor]) -> Example:
    image = tf.io.decode_image(tf.io.read_file(element['path']), channels=3,
                               expand_animations=False)
    return {'image': image, 'image_id': element['image_id'], 'boxes': element['boxes'],
            'labels': element['labels']}

  sizes = np.array([(im.height, im.width) for im in images], np.int64)
  return Source(
      elements=elements, load=load, num_examples=len(images),
      category_ids=annotations.category_ids, class_names=annotations.class_names,
      image_sizes=lambda n: _sample(sizes, n),
      ground_truth=lambda: annotations.ground_truth)


def _tfds_split(builder: tfds.core.DatasetBuilder, split: str, *,
                shuffle_seed: int | None = None) -> tf.data.Dataset:
  """The split with images left encoded (decoded after shuffling, or never)."""
  return builder.as_dataset(
      split=split, decoders={'image': tfds.decode.SkipDecoding()},
      shuffle_files=shuffle_seed is not None,
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))


def _tfds_ground_truth(split_ds: tf.data.Dataset, category_ids: tuple[int, ...],
                       class_names: tuple[str, ...]) -> dict[str, Any]:
  """A COCO-format dict built from the examples (TFDS keeps no annotation file)."""
  def meta(ex):
    return {'id': ex['image/id'], 'size': tf.image.extract_jpeg_shape(ex['image'])[:2],
            'objects': ex['objects']}

  images, annotations = [], []
  for ex in split_ds.map(meta, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator():
    height, width = (int(v) for v in ex['size'])
    image_id = int(ex['id'])
    images.append({'id': image_id, 'height': height, 'width': width})
    objects = ex['objects']
    for ann_id, area, (y0, x0, y1, x1), label, crowd in zip(
        objects['id'], objects['area'], objects['bbox'], objects['label'], objects['is_crowd']):
      annotations.append({
          'id': int(ann_id), 'image_id': image_id, 'category_id': category_ids[label],
          'bbox': [float(x0 * width), float(y0 * height), float((x1 - x0) * width),
                   float((y1 - y0) * height)],
          'area': float(area), 'iscrowd': int(crowd)})
  categories = [{'id': c, 'name': n} for c, n in zip(category_ids, class_names)]
  return {'images': images, 'annotations': annotations, 'categories': categories}


def tfds_coco(name: str, split: str, *, data_dir: str | None, shuffle_seed: int | None,
              process_index: int, process_count: int) -> Source:
  """TFDS `coco/2014` or `coco/2017` (80 classes), prepared beforehand in `data_dir`.

  `shuffle_seed` (None: file order) shuffles the order of the record files.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  label = builder.info.features['objects']['label']
  if label.num_classes != len(COCO_CATEGORY_IDS):
    raise ValueError(f'TFDS dataset {name!r} has {label.num_classes} classes; only the '
                     f'{len(COCO_CATEGORY_IDS)}-class COCO detection configs are supported')
  class_names = tuple(label.names)
  whole = _tfds_split(builder, split)
  num_examples = int(whole.cardinality())
  if num_examples < 0:
    raise ValueError(f'Unknown number of examples in split {split!r} of {name!r}')
  host_split = split if process_count == 1 else tfds.even_splits(split, process_count)[
      process_index]
  elements = _tfds_split(builder, host_split, shuffle_seed=shuffle_seed)

  def load(ex: dict[str, Any]) -> Example:
    image = tf.io.decode_jpeg(ex['image'], channels=3)
    height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
    y0, x0, y1, x1 = tf.unstack(ex['objects']['bbox'], axis=-1)
    boxes = tf.stack([x0 * width, y0 * height, x1 * width, y1 * height], axis=-1)
    keep = tf.logical_not(ex['objects']['is_crowd'])
    return {'image': image, 'image_id': ex['image/id'],
            'boxes': tf.boolean_mask(boxes, keep),
            'labels': tf.cast(tf.boolean_mask(ex['objects']['label'], keep), tf.int32)}

  def image_sizes(n: int) -> np.ndarray:
    shapes = whole.take(n).map(lambda ex: tf.image.extract_jpeg_shape(ex['image'])[:2],
                               num_parallel_calls=tf.data.AUTOTUNE)
    return np.array(list(shapes.as_numpy_iterator()), np.int64).reshape(-1, 2)

  return Source(
      elements=elements, load=load, num_examples=num_examples,
      category_ids=COCO_CATEGORY_IDS, class_names=class_names, image_sizes=image_sizes,
      ground_truth=lambda: _tfds_ground_truth(whole, COCO_CATEGORY_IDS, class_names))
