"""Draws a checkpoint's detections, QnA attention maps and QnA window kernels as PNGs.

  python tools/visualize.py --config=configs/qna_detr_toy.py --workdir=workdirs/toy \\
      --output=/tmp/vis [--checkpoint=DIR] [--split=validation | --images=a.jpg,b.jpg] \\
      [--num_images=4] [--kind=detections,attention,kernels] [--threshold=0.5] \\
      [--layer=stage1_qna1] [--head=0 | --head=0,3 | --head=all] [--query=0]
  python tools/visualize.py --config=... --workdir=... --list_layers

Per image, into --output:
  NAME_detections.png     boxes scoring >= --threshold, 'class score', original pixels.
  NAME_attention_L.png    supplement Figure 1: for each pixel, the sum of the softmax weights
                          that every k x k window containing it puts on it (QnA layer L, per
                          head, one learned query; windows centred on padding left out),
                          upsampled and overlaid on the image. The softmax is over S + B on
                          the window's real pixels; the attention scale weights Ws multiply
                          the numerator only and are not part of it.
  NAME_kernels_L.png      supplement Figure 2: every window's k x k softmax weights, tiled at
                          the window's place, next to the image.
and once (with --kind=kernels):
  kernel_parameters_L.png softmax(B) over the window and Ws, per query (row) and head (column).
"""
import logging
from collections.abc import Sequence
import os

from absl import flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from qna_detr import detectors
from qna_detr import workdir as run_files
from qna_detr.data import image_folder
from qna_detr.data import pipeline
from qna_detr.utils import runtime
from qna_detr.visualization import capture
from qna_detr.visualization import figures
from qna_detr.visualization import inputs

KINDS = ('detections', 'attention', 'kernels')

logger = logging.getLogger('qna_detr.tools.visualize')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file; default: the run\'s own (WORKDIR/config.json).',
    lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s workdir.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'A checkpoint step directory; default: the latest in workdir.')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the PNGs.')
_SPLIT = flags.DEFINE_enum('split', 'validation', ['validation', 'val', 'train'],
                           'Split of the config\'s dataset to draw (without --images).')
_IMAGES = flags.DEFINE_list('images', [], 'Image files to draw instead of a split.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 4, 'Images of the split to draw.')
_KIND = flags.DEFINE_list('kind', list(KINDS), f'Pictures to draw, any of {KINDS}.')
_THRESHOLD = flags.DEFINE_float('threshold', 0.5, 'Smallest score of a drawn detection.')
_LAYER = flags.DEFINE_string('layer', '0', 'QnA layer: its index, its name or a unique part '
                             'of it (e.g. stage1_qna1); see --list_layers.')
_HEAD = flags.DEFINE_list('head', ['0'], 'Attention heads of the layer, or "all".')
_QUERY = flags.DEFINE_integer('query', 0, 'Learned query of the layer.')
_MIN_SIDE = flags.DEFINE_integer('min_side', 256, 'Scale pictures up (integer factors) until '
                                 'their shorter side has at least this many pixels.')
_LIST_LAYERS = flags.DEFINE_bool('list_layers', False, 'Print the QnA layers and exit.')
flags.mark_flags_as_required(['workdir'])


def _save(image, output: str, name: str) -> str:
  path = os.path.join(output, name.replace('/', '_') + '.png')
  image.save(path)
  return path


def _draw_example(example: inputs.Example, detector: detectors.DetectorDef, capture_fn, params,
                  layer: capture.QnALayer, kinds: Sequence[str], class_names: Sequence[str],
                  options: dict, output: str) -> list[str]:
  """Every asked picture of one image; returns the written paths."""
  outputs, records = capture_fn(params, example.inputs, example.padding_mask)
  written = []
  tag = layer.short_name
  if 'detections' in kinds:
    detections = jax.device_get(detector.postprocess(outputs, np.asarray([example.orig_size]),
                                                     options['top_k']))
    detections = {k: v[0] for k, v in detections.items()}
    written.append(_save(figures.detections_figure(
        example, detections, class_names, options['threshold'], options['min_side']),
        output, f'{example.name}_detections'))
  if 'attention' in kinds or 'kernels' in kinds:
    seen = figures.layer_input(layer, capture.layer_params(params, layer.name),
                               *records[layer.name])
    args = (example, seen, options['heads'], options['query'], options['min_side'])
    if 'attention' in kinds:
      written.append(_save(figures.attention_figure(*args), output,
                           f'{example.name}_attention_{tag}'))
    if 'kernels' in kinds:
      written.append(_save(figures.kernels_figure(*args), output,
                           f'{example.name}_kernels_{tag}'))
  return written


def visualize(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None,
              output: str, *, split: str = 'validation', images: list[str] | None = None,
              num_images: int = 4, kinds: Sequence[str] = KINDS, threshold: float = 0.5,
              layer: str = '0', heads: Sequence[str] = ('0',), query: int = 0,
              min_side: int = 256, list_layers: bool = False) -> list[str]:
  """Writes the PNGs; returns their paths (with list_layers: prints the layers instead)."""
  bad = sorted(set(kinds) - set(KINDS))
  if bad or not kinds:
    raise ValueError(f'--kind={",".join(kinds)}: choose from {KINDS}.')
  config = run_files.load_config(workdir, config)[0]
  dataset = pipeline.build_dataset(config, split=split, global_batch_size=config.eval_batch_size,
                                   shuffle_seed=0, train=False)
  detector = detectors.build(config, dataset.num_classes)
  layers = capture.describe_layers(detector.module, detector.abstract_params())
  if list_layers:
    for index, item in enumerate(layers.values()):
      print(f'{index}: {item.short_name} ({item.name}): heads {item.heads}, queries '
            f'{item.num_queries}, kernel {item.kernel_size}, stride {item.stride}')
    return []
  chosen = capture.select_layer(layers, layer)
  options = dict(heads=capture.select_heads(chosen, heads),
                 query=capture.check_query(chosen, query), threshold=threshold,
                 min_side=min_side, top_k=config.eval_top_k)
  step_dir, params = run_files.load_params(workdir, checkpoint, detector, config)
  logger.info('Drawing %s with %s (layer %s)', kinds, step_dir, chosen.name)
  os.makedirs(output, exist_ok=True)
  names = None
  if images:  # The same evaluation transform, on the files.
    source, _ = image_folder.image_files(images)
    dataset = pipeline.build_dataset(config, split=split, global_batch_size=1, shuffle_seed=0,
                                     train=False, process_index=0, process_count=1,
                                     source=source)
    names = {}
    for im in dataset.coco_ground_truth()['images']:
      stem = os.path.splitext(os.path.basename(im['file_name']))[0]
      names[im['id']] = f'{stem}_{im["id"]}' if stem in names.values() else stem
    num_images = len(names)
  examples = inputs.from_split(dataset, num_images, names)
  capture_fn = capture.make_capture_fn(detector.module)
  written = []
  for example in examples:
    written += _draw_example(example, detector, capture_fn, params, chosen, list(kinds),
                             dataset.class_names, options, output)
  if 'kernels' in kinds:
    written.append(_save(figures.kernel_parameters_figure(
        chosen, capture.layer_params(params, chosen.name)), output,
        f'kernel_parameters_{chosen.short_name}'))
  return written


def main(argv):
  del argv
  if not _OUTPUT.value and not _LIST_LAYERS.value:
    raise flags.ValidationError('--output is required.')
  written = visualize(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _OUTPUT.value,
                      split=_SPLIT.value, images=_IMAGES.value, num_images=_NUM_IMAGES.value,
                      kinds=_KIND.value, threshold=_THRESHOLD.value, layer=_LAYER.value,
                      heads=_HEAD.value, query=_QUERY.value, min_side=_MIN_SIDE.value,
                      list_layers=_LIST_LAYERS.value)
  if written:
    print('wrote\n  ' + '\n  '.join(written), flush=True)


if __name__ == '__main__':
  runtime.run_app(main)
