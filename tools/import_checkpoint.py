"""Imports a released checkpoint into a workdir that the tools and the Detector API read like a
trained run's (config.json and a checkpoint at step 0; training the workdir fine-tunes it).

  python tools/import_checkpoint.py --format=dino --checkpoint=checkpoint0011_4scale.pth \\
      --config=configs/dino_resnet50_coco.py --workdir=workdirs/dino_r50_released
  python tools/evaluate.py --workdir=workdirs/dino_r50_released \\
      --config.dataset.data_dir=/path/to/tensorflow_datasets

Formats: 'dino', IDEA-Research/DINO's `torch.save` checkpoints ({'model': state_dict, ...};
`qna_detr.detectors.dino.official_weights`), read without torch. The checkpoint's class head
has COCO's 91 category ids; the workdir keeps the 80 classes of COCO detection (or
--category_ids / --class_names for another label space). A checkpoint without backbone
tensors takes its backbone from --config.pretrained.path. Every tensor must be used and every
parameter of the config's detector filled: a missing or an extra one is refused, named.
"""
import logging
import os

from absl import flags
from flax import traverse_util
import jax
from ml_collections import config_flags

from qna_detr import detectors
from qna_detr import workdir as run_files
from qna_detr.backbones import weights
from qna_detr.data import sources
from qna_detr.detectors.dino import official_weights
from qna_detr.train import checkpoints
from qna_detr.train import config_checks
from qna_detr.train import optimizer
from qna_detr.train import train_step
from qna_detr.utils import runtime

FORMATS = {'dino': official_weights.read}
logger = logging.getLogger('qna_detr.tools.import_checkpoint')
_FORMAT = flags.DEFINE_enum('format', 'dino', sorted(FORMATS), 'The checkpoint\'s layout.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'The released checkpoint (.pth).')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'The experiment config whose '
                                          'detector the checkpoint is.', lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir to write (new or empty).')
_CATEGORY_IDS = flags.DEFINE_list('category_ids', None, 'The checkpoint\'s class rows to '
                                  'keep (default: COCO detection\'s 80 ids).')
_CLASS_NAMES = flags.DEFINE_list('class_names', None, 'Their names (default: COCO\'s).')
flags.mark_flags_as_required(['checkpoint', 'config', 'workdir'])


def _classes() -> tuple[list[int], list[str]]:
  ids = [int(c) for c in _CATEGORY_IDS.value] if _CATEGORY_IDS.value else list(
      sources.COCO_CATEGORY_IDS)
  names = _CLASS_NAMES.value or (list(sources.COCO_CLASS_NAMES) if not _CATEGORY_IDS.value
                                 else [str(c) for c in ids])
  if len(names) != len(ids):
    raise flags.ValidationError(f'--class_names has {len(names)} names for {len(ids)} '
                                '--category_ids.')
  return ids, names


def _check_fits(tree, abstract, path: str) -> None:
  """The converted tree has exactly the detector's parameters, with their shapes."""
  got = traverse_util.flatten_dict(tree, sep='/')
  want = traverse_util.flatten_dict(abstract, sep='/')
  missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
  shapes = [f'{k}: checkpoint {got[k].shape}, config {want[k].shape}' for k in want
            if k in got and tuple(got[k].shape) != tuple(want[k].shape)]
  if missing or extra or shapes:
    raise ValueError(f'{path} is not this config\'s detector: '
                     + '; '.join(([f'{len(shapes)} shapes differ ({shapes[:3]})'] if shapes
                                  else []) + ([f'missing {missing[:5]}'] if missing else [])
                                 + ([f'unexpected {extra[:5]}'] if extra else [])))


def import_checkpoint(config, path: str, workdir: str, fmt: str, category_ids, class_names
                      ) -> str:
  """Writes the workdir; returns its checkpoint's step directory."""
  config = config_checks.check_config(config)
  if run_files.has_checkpoint(workdir):
    raise FileExistsError(f'--workdir={workdir} already holds checkpoints: choose a new one')
  detector = detectors.build(config, len(category_ids))
  tree, report = FORMATS[fmt](path, config.model.num_heads, category_ids)
  logger.info('%s: %s', path, report.summary())
  if report.unknown:
    raise ValueError(f'{path} holds tensors the {fmt!r} format does not know: '
                     f'{report.unknown[:8]}')
  abstract = detector.abstract_params()
  if 'backbone' not in tree:
    if not config.pretrained.path:
      raise ValueError(f'{path} holds no backbone tensors: give the backbone\'s weights with '
                       '--config.pretrained.path')
    tree['backbone'] = weights.load_pretrained_backbone({'backbone': abstract['backbone']},
                                                        config)['backbone']
  _check_fits(tree, abstract, path)
  tx, _ = optimizer.build_optimizer(config, epoch_steps=1, total_steps=2**31 - 1,
                                    mask=train_step.frozen_mask(config, detector))
  state = train_step.create_state(lambda key: tree, tx, jax.random.PRNGKey(config.rng_seed),
                                  ema=config.ema_decay > 0)
  os.makedirs(workdir, exist_ok=True)
  run_files.save_config(workdir, config)
  round_up = lambda v: -(-v // config.dataset.bucket_multiple) * config.dataset.bucket_multiple
  short, long = round_up(config.dataset.eval_scale), round_up(config.dataset.eval_max_size)
  buckets = config.dataset.eval_bucket_shapes or ((short, long), (long, short))
  run_files.save_classes(workdir, class_names, category_ids, buckets, buckets)
  writer = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
  writer.save(0, state)
  writer.close()
  return os.path.join(workdir, run_files.CHECKPOINTS, '0')


def main(argv):
  del argv
  ids, names = _classes()
  step_dir = import_checkpoint(_CONFIG.value, _CHECKPOINT.value, _WORKDIR.value, _FORMAT.value,
                               ids, names)
  logger.info('Wrote %s and %s: evaluate with tools/evaluate.py --workdir=%s', step_dir,
              os.path.join(_WORKDIR.value, run_files.CONFIG_FILE), _WORKDIR.value)


if __name__ == '__main__':
  runtime.run_app(main)
