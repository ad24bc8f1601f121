"""Exports a trained detector as serialized jax.export programs (qna_detr/export/model.py).

  python tools/export_model.py --workdir=workdirs/toy --output=exported \\
      [--checkpoint=DIR] [--image_size=H,W ...] [--dtype=bfloat16] [--platforms=cpu,cuda]

Writes detector_HxW.jax per input shape (default: the run's evaluation bucket shapes) and
model.json (inputs, outputs, the resize to apply before, class names). The programs run with
jax alone: `jax.export.deserialize(bytes).call(images, sizes, orig_sizes)`.
"""
import logging
import os

from absl import flags

from qna_detr import workdir as run_files
from qna_detr.backbones import base
from qna_detr.export import model
from qna_detr.utils import runtime

_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s workdir.', required=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A checkpoint step directory; default: '
                                  'the newest intact one in the workdir.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory of the export.', required=True)
_IMAGE_SIZE = flags.DEFINE_multi_string(
    'image_size', [], 'H,W of an input shape (repeat for several); default: the run\'s '
    'evaluation bucket shapes.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', sorted(base.DTYPES), 'Compute dtype.')
_PLATFORMS = flags.DEFINE_list('platforms', [], 'Platforms to lower for (cpu, cuda, tpu); '
                               'default: this machine\'s.')
logger = logging.getLogger('qna_detr.tools.export_model')


def _shapes(values: list[str]) -> list[tuple[int, int]]:
  shapes = []
  for value in values:
    parts = value.split(',')
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
      raise flags.ValidationError(f'--image_size={value} must be H,W (positive integers)')
    shapes.append((int(parts[0]), int(parts[1])))
  return shapes


def main(argv):
  del argv
  run = run_files.load_run(_WORKDIR.value, _CHECKPOINT.value)
  info = model.export(run, _OUTPUT.value, shapes=_shapes(_IMAGE_SIZE.value),
                      dtype=_DTYPE.value, platforms=_PLATFORMS.value or None,
                      source={'workdir': os.path.abspath(_WORKDIR.value),
                              'checkpoint': run.step_dir})
  logger.info('Wrote %s and %s to %s', ', '.join(p['file'] for p in info['programs']),
              model.INFO, _OUTPUT.value)


if __name__ == '__main__':
  runtime.run_app(main)
