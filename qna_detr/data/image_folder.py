"""Unlabelled image files (a folder or a list) as a detection source, for inference.

Every file is decoded once up front with the decoder the pipeline uses (`image_check`), so
that a corrupt image or a non-image file is skipped and named in the log, rather than
stopping the input pipeline halfway. Image ids number the readable images 0, 1, ... in the
given order (a folder: file-name order, subfolders not read).
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import os

import numpy as np
import tensorflow as tf

from qna_detr.data import image_check
from qna_detr.data import sources

logger = logging.getLogger(__name__)

# The formats tf.io.decode_image reads.
EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.webp')


def _decode(path: str) -> tf.Tensor:
  return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def image_folder(image_dir: str) -> tuple[sources.Source, list[str]]:
  """The readable images directly in `image_dir`; see `image_files`."""
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f'No image folder at {image_dir}')
  return image_files([os.path.join(image_dir, n) for n in sorted(os.listdir(image_dir))],
                     image_dir)


def image_files(paths: Sequence[str], root: str = '') -> tuple[sources.Source, list[str]]:
  """The readable images among `paths` (all of them, for one process), without boxes.

  Args:
    paths: image files.
    root: file names in the ground truth are relative to it ('' = the paths as given).

  Returns:
    The source, whose ground truth lists the images (id, file_name, height, width), and the
    skipped entries as 'name: reason', each also logged.
  """
  checked = [p for p in paths if os.path.isfile(p) and p.lower().endswith(EXTENSIONS)]
  results = dict(zip(checked, zip(*reversed(image_check.check(checked)))))
  images, skipped = [], []
  for path in paths:
    if not os.path.isfile(path):
      size, problem = None, 'not a file'
    elif path not in results:
      size, problem = None, f'not an image file (extensions read: {", ".join(EXTENSIONS)})'
    else:
      size, problem = results[path]
    name = os.path.relpath(path, root) if root else path
    if problem:
      logger.warning('Skipping %s: %s', path, problem)
      skipped.append(f'{name}: {problem}')
    else:
      images.append({'id': len(images), 'file_name': name, 'height': size[0], 'width': size[1],
                     'path': path})
  if not images:
    raise ValueError(f'No readable image in {root or list(paths)} ({len(skipped)} files '
                     f'skipped)')
  elements = tf.data.Dataset.from_tensor_slices({
      'path': [im.pop('path') for im in images],
      'image_id': np.array([im['id'] for im in images], np.int64),
  })

  def load(element: dict[str, tf.Tensor]) -> sources.Example:
    return {'image': _decode(element['path']), 'image_id': element['image_id'],
            'boxes': tf.zeros([0, 4], tf.float32), 'labels': tf.zeros([0], tf.int32)}

  sizes = np.array([(im['height'], im['width']) for im in images], np.int64)
  ground_truth = {'images': images, 'annotations': [], 'categories': []}
  return sources.Source(
      elements=elements, load=load, num_examples=len(images), category_ids=(),
      class_names=(), image_sizes=lambda n: sizes[:n], ground_truth=lambda: ground_truth), skipped
