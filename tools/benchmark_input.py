"""Benchmarks the training input pipeline at COCO sizes: images/s and padding waste.

Writes a synthetic COCO-format folder whose image sizes follow COCO 2017's mix (see
`coco_like_sizes`), runs the training pipeline with DETR's transforms on it, and reports
images/s and the padding waste (padded pixels over all pixels) of the produced batches,
beside the waste of padding every image to max_size x max_size (Scenic's DETR pipeline).
The same figures for the eval split, and estimates of the training waste over a larger
sample of sizes (also with `bucket_max_rescale = 1`, DETR's exact scales), complete them.

  python tools/benchmark_input.py [--json PATH]
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags
import ml_collections
import numpy as np

from qna_detr.data import batching
from qna_detr.data import dataset_config
from qna_detr.data import pipeline
from qna_detr.data import toy
from qna_detr.utils import runtime

_JSON = flags.DEFINE_string('json', None, 'Write the figures to this JSON file.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 256, 'Training images to write.')
_NUM_VAL = flags.DEFINE_integer('num_val', 128, 'Validation images to write.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Global batch size.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 40, 'Timed training batches.')
_WARMUP = flags.DEFINE_integer('warmup_batches', 5, 'Untimed training batches first.')
_SAMPLE = flags.DEFINE_integer('sample_size', 5000, 'Sizes for the waste estimates.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for the images (default: temporary).')


def coco_like_sizes(count: int, rng: np.random.Generator) -> np.ndarray:
  """(height, width) pairs that approximate COCO 2017's image sizes.

  COCO images mostly have a longer side of 640 pixels, about half at 4:3 and a quarter at
  3:2, a few square and the rest spread between 1:1 and 2:1; about three quarters are
  landscape.
  """
  kind = rng.choice(4, count, p=[0.45, 0.25, 0.05, 0.25])
  aspect = np.choose(kind, [np.full(count, 4 / 3), np.full(count, 1.5), np.ones(count),
                            rng.uniform(1.0, 2.0, count)])
  long = np.where(rng.uniform(size=count) < 0.93, 640, rng.integers(300, 640, count))
  short = np.round(long / aspect).astype(np.int64)
  landscape = rng.uniform(size=count) < 0.74
  return np.stack([np.where(landscape, short, long), np.where(landscape, long, short)], -1)


def waste(batches: list[dict[str, np.ndarray]], max_size: int) -> tuple[float, float]:
  """Padding waste of the valid examples: in their buckets, and padded to max_size^2."""
  padded = total = image = 0
  for b in batches:
    valid = b['valid']
    padded += b['padding_mask'][valid].sum()
    total += valid.sum() * b['padding_mask'].shape[1] * b['padding_mask'].shape[2]
    image += np.prod(b['size'][valid].astype(np.int64), -1).sum()
  count = sum(b['valid'].sum() for b in batches)
  return float(padded / total), float(1 - image / (count * max_size**2))


def main(argv: list[str]) -> None:
  del argv
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='benchmark_input_')
  rng = np.random.default_rng(0)
  toy.write_split(workdir, 'train', coco_like_sizes(_NUM_TRAIN.value, rng), seed=0)
  toy.write_split(workdir, 'val', coco_like_sizes(_NUM_VAL.value, rng), seed=0,
                  first_image_id=_NUM_TRAIN.value + 1)
  cfg = dataset_config.default_config()
  cfg.name = 'coco_folder'
  cfg.update(toy.paths(workdir))
  config = ml_collections.ConfigDict({'dataset': cfg})
  build = lambda split, train: pipeline.build_dataset(
      config, split=split, global_batch_size=_BATCH_SIZE.value, shuffle_seed=0, train=train)

  train = build('train', True)
  it = iter(train)
  for _ in range(_WARMUP.value):
    next(it)
  start = time.perf_counter()
  batches = [next(it) for _ in range(_NUM_BATCHES.value)]
  images_per_s = _NUM_BATCHES.value * _BATCH_SIZE.value / (time.perf_counter() - start)
  bucketed, square = waste(batches, cfg.train_max_size)

  val = build('val', False)
  val_batches = list(val)
  val_bucketed, val_square = waste(val_batches, cfg.eval_max_size)

  sizes = pipeline.output_sizes(coco_like_sizes(_SAMPLE.value, rng),
                                pipeline.augmentation(cfg, train=True), seed=1)
  exact_buckets = batching.derive_buckets(
      sizes, num_buckets=cfg.num_buckets, multiple=cfg.bucket_multiple,
      max_output_shape=(max(cfg.train_scales), cfg.train_max_size), max_rescale=1.0)
  figures = {
      'images_per_s': images_per_s,
      'padding_waste_bucketed': bucketed,
      'padding_waste_square': square,
      'distinct_shapes': len(train.bucket_shapes),
      'distinct_shapes_seen': len({b['inputs'].shape[1:3] for b in batches}),
      'bucket_shapes': [list(s) for s in train.bucket_shapes],
      'eval_padding_waste_bucketed': val_bucketed,
      'eval_padding_waste_square': val_square,
      'eval_distinct_shapes': len(val.bucket_shapes),
      'eval_bucket_shapes': [list(s) for s in val.bucket_shapes],
      'padding_waste_bucketed_estimate': batching.padding_waste(
          sizes, train.bucket_shapes, cfg.bucket_max_rescale),
      'padding_waste_exact_scales_estimate': batching.padding_waste(sizes, exact_buckets, 1.0),
      'bucket_max_rescale': cfg.bucket_max_rescale,
      'images_timed': _NUM_BATCHES.value * _BATCH_SIZE.value,
      'global_batch_size': _BATCH_SIZE.value,
      'cpu_count': os.cpu_count(),
  }
  print(json.dumps(figures, indent=2))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(figures, f, indent=2)


if __name__ == '__main__':
  runtime.run_app(main)
