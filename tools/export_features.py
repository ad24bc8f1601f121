"""Exports the backbone's feature maps of a dataset split or of a folder of images.

  python tools/export_features.py --config=configs/qna_detr_toy.py --workdir=workdirs/toy \\
      --split=validation --output=/tmp/features [--levels=8,16] [--dtype=float16]
  python tools/export_features.py --config=... --workdir=... --image_dir=DIR --output=OUT \\
      [--size=512] [--checkpoint=PATH]

The backbone's parameters come from the workdir's latest checkpoint, or from --checkpoint (a
step directory of a detector or a classifier of this project, or one of the authors' released
QnA-ViT msgpack files); the backbone computes in config.model.dtype. Images get the config's
evaluation resize and normalization; --size=N resizes them so that their longer side is N
instead (N - 1 for some aspect ratios, by DETR's rounding), in buckets derived for that size.
Readable files of --image_dir are exported, the others are skipped and listed in the log. Each
map keeps its valid (unpadded) region only. Output: shards of numpy arrays, an index and
export_info.json, described in qna_detr/export/features.py. Rerunning an interrupted
export with the same arguments continues after its last complete shard.
"""
import logging
import os
import time

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from qna_detr import parallel
from qna_detr import workdir as run_files
from qna_detr.backbones import base
from qna_detr.backbones import registry
from qna_detr.data import image_folder
from qna_detr.data import pipeline
from qna_detr.export import features
from qna_detr.utils import runtime
from qna_detr.utils import checkpoint_io

logger = logging.getLogger('qna_detr.tools.export_features')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file; default: the run\'s own (WORKDIR/config.json).',
    lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s workdir.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'A checkpoint step directory or an authors\' msgpack file; default: the '
    'latest in workdir.')
_SPLIT = flags.DEFINE_enum('split', None, ['validation', 'val', 'train'],
                           'Split of the config\'s dataset to export.')
_IMAGE_DIR = flags.DEFINE_string('image_dir', None, 'A folder of images to export instead.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory of the export.')
_LEVELS = flags.DEFINE_list('levels', None, 'Strides of the feature maps to export; default: '
                            'all of the backbone\'s (4,8,16,32; the nano variant has 4,8,16).')
_SIZE = flags.DEFINE_integer('size', None, 'Resize images so that their longer side is this '
                             '(default: the config\'s evaluation resize).', lower_bound=1)
_DTYPE = flags.DEFINE_enum('dtype', 'float32', sorted(features.DTYPES),
                           'Storage type of the features.')
_SHARD_SIZE = flags.DEFINE_integer('shard_size', 64, 'Images per shard.', lower_bound=1)
flags.mark_flags_as_required(['workdir', 'output'])
flags.mark_flags_as_mutual_exclusive(['split', 'image_dir'], required=True)


def _levels(requested: list[str] | None, available: list[int]) -> list[int]:
  """The strides to export, checked against the backbone's before any work is done."""
  if not requested:
    return available
  try:
    levels = sorted({int(s) for s in requested})
  except ValueError:
    raise ValueError(f'--levels={",".join(requested)} must list strides (integers) among '
                     f'the backbone\'s {available}') from None
  missing = [s for s in levels if s not in available]
  if missing:
    raise ValueError(f'--levels={",".join(requested)}: stride(s) {missing} not available; '
                     f'this config\'s backbone has strides {available}')
  return levels


def _checkpoint_path(workdir: str, checkpoint: str | None) -> tuple[str, int | None]:
  """The checkpoint to read and its training step (None for a msgpack file)."""
  if checkpoint and os.path.isfile(checkpoint):
    return os.path.abspath(checkpoint), None
  step_dir = run_files.find_checkpoint(workdir, checkpoint) or checkpoint_io.resolve_step_dir(
      os.path.join(workdir, run_files.CHECKPOINTS))
  return step_dir, int(os.path.basename(step_dir))


def _resize_to(config: ml_collections.ConfigDict, size: int | None) -> None:
  """Sets the eval resize to longer side `size` (DETR's, with scale = max size), buckets
  derived for it."""
  if size:
    config.dataset.update(eval_scale=size, eval_max_size=size, eval_bucket_shapes=())


def export_features(config: ml_collections.ConfigDict, workdir: str, *, checkpoint: str | None,
                    split: str | None, image_dir: str | None, output: str,
                    levels: list[str] | None, size: int | None, dtype: str,
                    shard_size: int) -> int:
  """Runs (or resumes) the export; returns the number of images computed by this call."""
  start = time.time()
  config = run_files.load_config(workdir, config)[0]
  _resize_to(config, size)
  backbone = registry.build(config.model)
  channels = base.pyramid_levels(backbone)
  levels = _levels(levels, list(channels))
  path, step = _checkpoint_path(workdir, checkpoint)
  source, skipped = image_folder.image_folder(image_dir) if image_dir else (None, [])
  dataset = pipeline.build_dataset(config, split=split or 'val', shuffle_seed=0, train=False,
                                   global_batch_size=config.eval_batch_size, process_index=0,
                                   process_count=1, source=source)
  settings = {
      'config': config.to_dict(), 'checkpoint': path, 'step': step,
      'source': {'image_dir': os.path.abspath(image_dir)} if image_dir else {'split': split},
      'levels': levels, 'channels': {f'stride_{s}': channels[s] for s in levels},
      'dtype': dtype, 'size': size, 'shard_size': shard_size,
      'num_images': dataset.num_examples, 'bucket_shapes': dataset.bucket_shapes}
  writer = features.ShardWriter(output, settings, shard_size)
  if writer.complete:
    logger.info('%s already holds the complete export (%d images)', output, len(writer.done))
    return 0
  logger.info('Exporting strides %s of %d images with %s (step %s) to %s', levels,
               dataset.num_examples, path, step, output)
  params = features.load_backbone_params(backbone, path, config.model.backbone)
  names = (None if source is None and config.dataset.name == 'tfds_coco' else
           {im['id']: im['file_name'] for im in dataset.coco_ground_truth()['images']})
  extract_fn = features.make_extract_fn(backbone, list(channels), levels, dtype)
  computed = features.export(dataset, extract_fn, params, writer,
                             parallel.data_mesh(jax.local_devices()), names)
  logger.info('Wrote %d images (%d in this run, %.0fs) to %s', len(writer.done), computed,
               time.time() - start, output)
  if image_dir:
    logger.info('Skipped %d file(s) of %s that are not readable images%s', len(skipped),
                 image_dir, ''.join(f'\n  {s}' for s in skipped))
  return computed


def main(argv):
  del argv
  export_features(_CONFIG.value, _WORKDIR.value, checkpoint=_CHECKPOINT.value,
                  split=_SPLIT.value, image_dir=_IMAGE_DIR.value, output=_OUTPUT.value,
                  levels=_LEVELS.value, size=_SIZE.value, dtype=_DTYPE.value,
                  shard_size=_SHARD_SIZE.value)


if __name__ == '__main__':
  runtime.run_app(main)
