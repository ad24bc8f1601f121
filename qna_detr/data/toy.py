"""A synthetic COCO-format detection dataset: coloured shapes on textured backgrounds.

The project's embedded default dataset, small enough for a CPU to train on in minutes and
distinct enough for a small DETR to learn: five shape classes, each in its own colour
family, of varied size, aspect ratio and count, overlapping only partly (every object keeps
most of its area visible), on smooth colour fields with stripes and grain. Images have COCO's mix of
aspect ratios (1, 4:3, 3:2, landscape or portrait) with the longer side `image_size`.
Everything is drawn from `numpy.random.default_rng([seed, split, index])`, so an image
does not depend on how many others are made.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from qna_detr.utils import files

logger = logging.getLogger(__name__)

CLASSES = ('rectangle', 'ellipse', 'triangle', 'cross', 'ring')
ASPECT_RATIOS = (1.0, 4 / 3, 3 / 2)
MAX_OBJECTS = 6
MIN_VISIBLE = 0.6  # Fraction of an object's area that later objects must leave visible.
SPLITS = ('train', 'val')
# One colour family per class (red, green, blue, yellow, magenta), so that recognising a
# class is easy and a model trained from scratch on a CPU spends its minutes on localization.
CLASS_COLOURS = ((225, 40, 40), (40, 190, 60), (40, 80, 230), (235, 215, 30), (200, 40, 215))
COLOUR_JITTER = 25.0


def paths(data_dir: str) -> dict[str, str]:
  """Where `make_toy_coco` writes each split: {train,val}_{json,images}."""
  out = {}
  for split in SPLITS:
    out[f'{split}_json'] = os.path.join(data_dir, 'annotations', f'instances_{split}.json')
    out[f'{split}_images'] = os.path.join(data_dir, split)
  return out


def _shape_mask(kind: str, box: tuple[float, float, float, float], rng: np.random.Generator,
                height: int, width: int) -> np.ndarray:
  """Boolean [height, width] mask of one shape inscribed in box (x0, y0, x1, y1)."""
  mask = Image.new('L', (width, height))
  draw = ImageDraw.Draw(mask)
  x0, y0, x1, y1 = box
  bw, bh = x1 - x0, y1 - y0
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  if kind == 'rectangle':
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
  elif kind == 'ellipse':
    draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=1)
  elif kind == 'triangle':
    corners = [(x0, y1 - 1), (x1 - 1, y1 - 1), (cx, y0)]  # Apex up, then turned.
    turns = rng.integers(4)
    for _ in range(turns):  # Quarter turns within the box, scaled to keep its extent.
      corners = [(cx + (y - cy) * bw / bh, cy - (x - cx) * bh / bw) for x, y in corners]
    draw.polygon(corners, fill=1)
  elif kind == 'cross':
    t = rng.uniform(0.25, 0.4)
    draw.rectangle([cx - t * bw / 2, y0, cx + t * bw / 2 - 1, y1 - 1], fill=1)
    draw.rectangle([x0, cy - t * bh / 2, x1 - 1, cy + t * bh / 2 - 1], fill=1)
  elif kind == 'ring':
    t = rng.uniform(0.2, 0.35)
    draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=1)
    draw.ellipse([x0 + t * bw / 2, y0 + t * bh / 2, x1 - 1 - t * bw / 2, y1 - 1 - t * bh / 2],
                 fill=0)
  else:
    raise ValueError(f'Unknown shape {kind!r}')
  return np.asarray(mask, bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A muted smooth colour field with stripes: texture that is not any of the shapes."""
  grid = rng.integers(2, 6)
  coarse = (rng.uniform(40, 215, (grid, grid, 3)) * 0.6 + 128 * 0.4).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float64)
  yy, xx = np.mgrid[:height, :width]
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(4, 16)
  stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
  return image + rng.uniform(5, 20) * stripes[..., None]


def _colour(rng: np.random.Generator, kind: int) -> np.ndarray:
  """The class's saturated colour, jittered: it stands out from the muted backgrounds."""
  return np.asarray(CLASS_COLOURS[kind], np.float64) + rng.uniform(-COLOUR_JITTER,
                                                                  COLOUR_JITTER, 3)


def render_image(rng: np.random.Generator, height: int,
                 width: int) -> tuple[np.ndarray, list[dict]]:
  """Draws one image; returns it (uint8 [h, w, 3]) and its objects.

  Each object is {'category_id', 'bbox' [x, y, w, h] of its visible pixels, 'area'}.
  """
  image = _background(rng, height, width)
  objects = []  # (class index, full mask, visible mask)
  target = rng.integers(1, MAX_OBJECTS + 1)
  for _ in range(8 * MAX_OBJECTS):
    if len(objects) == target:
      break
    kind = rng.integers(len(CLASSES))
    side = rng.uniform(0.15, 0.5) * min(height, width)
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    bw = min(max(side * np.sqrt(aspect), 6.0), width)
    bh = min(max(side / np.sqrt(aspect), 6.0), height)
    x0, y0 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
    mask = _shape_mask(CLASSES[kind], (x0, y0, x0 + bw, y0 + bh), rng, height, width)
    if not all((visible & ~mask).sum() >= MIN_VISIBLE * full.sum()
               for _, full, visible in objects):
      continue
    for obj in objects:
      obj[2] &= ~mask
    objects.append([kind, mask, mask.copy()])
    colour = _colour(rng, kind)
    image[mask] = colour + rng.uniform(-12, 12, 3)
  image += rng.normal(0, rng.uniform(2, 8), image.shape)

  annotations = []
  for kind, _, visible in objects:
    ys, xs = np.nonzero(visible)
    x, y = int(xs.min()), int(ys.min())
    annotations.append({
        'category_id': int(kind) + 1,
        'bbox': [x, y, int(xs.max()) + 1 - x, int(ys.max()) + 1 - y],
        'area': int(visible.sum()),
    })
  return np.clip(np.round(image), 0, 255).astype(np.uint8), annotations


def _write_image(job: tuple) -> tuple[str, list[dict]]:
  """Renders and writes one image; returns its file name and objects."""
  image_dir, split, seed, image_id, index, height, width = job
  pixels, objects = render_image(np.random.default_rng([seed, SPLITS.index(split), index]),
                                 height, width)
  file_name = f'{image_id:012d}.jpg'
  Image.fromarray(pixels).save(os.path.join(image_dir, file_name), quality=90)
  return file_name, objects


def write_split(output_dir: str, split: str, sizes: Sequence[tuple[int, int]], seed: int,
                first_image_id: int = 1, params: dict | None = None) -> str:
  """Renders one image per (height, width) in `sizes` into a COCO folder split.

  `params` (the arguments that made the dataset) go into the file's 'info', where
  `ensure_toy_coco` checks them. Returns the path of the written annotation file (see `paths`).
  """
  split_paths = {k[len(split) + 1:]: v for k, v in paths(output_dir).items()
                 if k.startswith(split + '_')}
  os.makedirs(split_paths['images'], exist_ok=True)
  os.makedirs(os.path.dirname(split_paths['json']), exist_ok=True)
  jobs = [(split_paths['images'], split, seed, first_image_id + index, index, int(h), int(w))
          for index, (h, w) in enumerate(sizes)]
  # Every image has its own random stream, so threads can render them in any order (numpy
  # and PIL's encoder release the GIL for much of the work).
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    rendered = list(pool.map(_write_image, jobs))
  images, annotations = [], []
  for (_, _, _, image_id, _, height, width), (file_name, objects) in zip(jobs, rendered):
    images.append({'id': image_id, 'file_name': file_name, 'height': height, 'width': width})
    for obj in objects:
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id, 'iscrowd': 0,
                          'segmentation': [], **obj})
  data = {
      'info': {'description': f'Synthetic shapes ({split}), seed {seed}',
               'toy_params': params or {}},
      'images': images,
      'annotations': annotations,
      'categories': [{'id': i + 1, 'name': name, 'supercategory': 'shape'}
                     for i, name in enumerate(CLASSES)],
  }
  with open(split_paths['json'], 'w') as f:
    json.dump(data, f)
  return split_paths['json']


def toy_sizes(count: int, image_size: int, seed: int, split: str) -> list[tuple[int, int]]:
  """Image sizes with COCO's mix of aspect ratios and orientations, longer side image_size."""
  rng = np.random.default_rng([seed, SPLITS.index(split)])  # Apart from images' streams.
  aspects = rng.choice(ASPECT_RATIOS, count)
  short = np.round(image_size / aspects).astype(int)
  landscape = rng.uniform(size=count) < 0.7
  return [(s, image_size) if land else (image_size, s) for s, land in zip(short, landscape)]


def make_toy_coco(output_dir: str, *, num_train: int, num_val: int, image_size: int = 128,
                  seed: int = 0) -> dict[str, str]:
  """Writes the toy dataset (train and val splits) to output_dir; returns `paths`."""
  if image_size < 32:
    raise ValueError(f'image_size must be at least 32, got {image_size}')
  params = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
  for split, count, first_id in (('train', num_train, 1), ('val', num_val, num_train + 1)):
    write_split(output_dir, split, toy_sizes(count, image_size, seed, split), seed, first_id,
                params)
  return paths(output_dir)


def ensure_toy_coco(data_dir: str, *, num_train: int, num_val: int, image_size: int,
                    seed: int) -> dict[str, str]:
  """Makes the toy dataset in data_dir unless it is there; returns `paths`.

  Writes to a temporary sibling directory, then renames it, so that concurrent processes
  (several hosts, parallel tests) never read a half-written dataset. A dataset already there
  must have been made with the same arguments: a ValueError says which differ.
  """
  out = paths(data_dir)
  params = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
  if all(os.path.exists(out[f'{s}_json']) for s in SPLITS):
    _check_params(out['train_json'], params)
    return out
  parent = os.path.dirname(os.path.abspath(data_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.toy_coco_', dir=parent)
  try:
    make_toy_coco(tmp, **params)
    os.rename(tmp, data_dir)
  except OSError as e:
    if not all(os.path.exists(out[f'{s}_json']) for s in SPLITS):
      raise FileExistsError(f'{data_dir} exists but holds no toy dataset') from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def _check_params(train_json: str, params: dict[str, int]) -> None:
  """Raises if the dataset of `train_json` was made with other arguments than `params`."""
  with open(train_json) as f:
    made_with = json.load(f).get('info', {}).get('toy_params', {})
  folder = os.path.dirname(os.path.dirname(train_json))
  files.check_settings(made_with, params, f'The toy dataset in {folder}',
                       'delete that folder to make the new one, or set '
                       'config.toy_data.data_dir elsewhere', prefix='config.toy_data.')


def _data_dir(toy_data: Any, workdir: str) -> str:
  return toy_data.data_dir or os.path.join(workdir, 'toy_coco')


def _given_paths(config: Any) -> list[str]:
  """The COCO-folder paths a user set on a config that asks for the toy set."""
  return [f'config.dataset.{k}' for k in paths('') if config.dataset.get(k)]


def dataset_sizes(image_size: int) -> dict[str, Any]:
  """`config.dataset`'s sizes for toy images of longer side `image_size`: DETR's resize
  settings scaled down, one padded shape per split (a CPU compiles each shape once)."""
  scale = image_size / 800
  return dict(
      train_scales=tuple(sorted({int(round(s * scale / 8)) * 8 for s in range(480, 801, 64)})),
      crop_resize_scales=tuple(int(round(s * scale)) for s in (400, 500, 600)),
      crop_min_size=int(round(384 * scale)), crop_max_size=int(round(600 * scale)),
      eval_scale=image_size, train_max_size=image_size, eval_max_size=image_size,
      train_bucket_shapes=((image_size, image_size),),
      eval_bucket_shapes=((image_size, image_size),))


def resolve(config: Any, workdir: str) -> Any:
  """Where `config.toy_data` asks for the toy set: the config reading it (in
  `toy_data.data_dir`, default WORKDIR/toy_coco) as its COCO folder, without making it, its
  sizes following `toy_data.image_size` (`dataset_sizes`, where an override changed it).
  Other configs, and toy configs given COCO-folder paths of their own, are returned as they
  are."""
  toy_data = config.get('toy_data')
  if not toy_data or _given_paths(config):
    return config
  config = copy.deepcopy(config)
  config.dataset.update(name='coco_folder', **paths(os.path.abspath(_data_dir(toy_data,
                                                                                workdir))))
  if config.dataset.eval_scale != toy_data.image_size:
    config.dataset.update(dataset_sizes(toy_data.image_size))
  return config


def prepare(config: Any, workdir: str) -> Any:
  """`resolve`, the toy set made first unless it is there (or the config names a COCO
  folder of its own, which it then reads instead, with a line that says so)."""
  toy_data = config.get('toy_data')
  if not toy_data:
    return config
  given = _given_paths(config)
  if given:
    logger.info('%s given: the run reads that COCO folder, not the toy set', ', '.join(given))
    return config
  data_dir = _data_dir(toy_data, workdir)
  if not os.path.exists(paths(data_dir)['val_json']):
    logger.info('Making the toy set (%d + %d images) in %s', toy_data.num_train,
                toy_data.num_val, data_dir)
  ensure_toy_coco(data_dir, num_train=toy_data.num_train, num_val=toy_data.num_val,
                  image_size=toy_data.image_size, seed=toy_data.seed)
  return resolve(config, workdir)
