"""`config.dataset`: the input pipeline's settings (`default_config`) and the toy set's.

Kept apart from the pipeline (which needs TensorFlow) so that configs load without it.
"""
import ml_collections

from qna_detr.data import toy

NAMES = ('coco_folder', 'tfds_coco')


def default_config() -> ml_collections.ConfigDict:
  """DETR's COCO settings, reading TFDS `coco/2017` (the `config.dataset` sub-config)."""
  return ml_collections.ConfigDict({
      'name': 'tfds_coco',  # One of NAMES.
      'data_dir': '',  # TFDS data_dir ('' for TFDS's default).
      'tfds_name': 'coco/2017',
      'train_split': 'train',
      'val_split': 'validation',
      # COCO-format folders ('coco_folder'): instances JSON files and image directories.
      'train_json': '',
      'train_images': '',
      'val_json': '',
      'val_images': '',
      # DETR's transforms.
      'train_scales': tuple(range(480, 801, 32)),
      'train_max_size': 1333,
      'crop_resize_scales': (400, 500, 600),
      'crop_min_size': 384,
      'crop_max_size': 600,
      'eval_scale': 800,
      'eval_max_size': 1333,
      'max_boxes': 100,  # Boxes beyond it are dropped (with a logged warning).
      'skip_bad_examples': False,  # Skip bad images and annotations, logged, or raise.
      # Buckets: explicit ((H, W), ...) per split, or derived from a sample of the split.
      # Tuples, not lists, so that --config.KEY='(...)' can override them.
      'train_bucket_shapes': (),
      'eval_bucket_shapes': (),
      'num_buckets': 8,
      'bucket_multiple': 32,  # The backbone's total stride.
      'bucket_max_rescale': 1.05,  # Training images may be rescaled by up to this to fit.
      'bucket_sample_size': 2000,
      'shuffle_buffer': 2000,
      'prefetch': 2,  # Batches; -1 for tf.data's autotuning.
  })


def toy_config(data_dir: str = '', image_size: int = 128) -> ml_collections.ConfigDict:
  """The synthetic dataset as a COCO folder (`toy.paths(data_dir)`; '' = paths to be set when
  the set is made), with DETR's sizes scaled down to `image_size`."""
  config = default_config()
  config.name = 'coco_folder'
  if data_dir:
    config.update(toy.paths(data_dir))
  scale = image_size / 800
  config.train_scales = tuple(sorted({int(round(s * scale / 8)) * 8 for s in range(480, 801, 64)}))
  config.train_max_size = config.eval_max_size = int(round(1333 * scale))
  config.crop_resize_scales = tuple(int(round(s * scale)) for s in (400, 500, 600))
  config.crop_min_size = int(round(384 * scale))
  config.crop_max_size = int(round(600 * scale))
  config.eval_scale = image_size
  return config
