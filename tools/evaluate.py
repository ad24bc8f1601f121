"""Evaluates a checkpoint for COCO mAP with pycocotools.

  python tools/evaluate.py --config=configs/qna_detr_toy.py --workdir=/tmp/toy
  python tools/evaluate.py --config=... --workdir=... --checkpoint=/tmp/toy/checkpoints/500 \\
      --split=validation --output=/tmp/toy/eval

Prints pycocotools' 12-line summary and a per-category AP table; writes metrics.json,
detections.json (COCO results, original category ids) and per_category_ap.txt to --output
(default: WORKDIR/eval/<step>, so that the run's own results stay as they are).
"""
import logging
import os

from absl import flags
import jax
from ml_collections import config_flags

from qna_detr import detectors
from qna_detr import parallel
from qna_detr import workdir as run_files
from qna_detr.data import pipeline
from qna_detr.evaluation import coco_eval
from qna_detr.evaluation import predict
from qna_detr.utils import runtime

logger = logging.getLogger('qna_detr.tools.evaluate')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file; default: the run\'s own (WORKDIR/config.json).',
    lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s workdir.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A checkpoint step directory; default: '
                                  'the newest intact one in the workdir.')
_SPLIT = flags.DEFINE_enum('split', 'validation', ['validation', 'val', 'train'],
                           'Split of the config\'s dataset to evaluate.')
_OUTPUT = flags.DEFINE_string('output', None,
                              'Where to write the results (default: WORKDIR/eval/<step>).')
flags.mark_flags_as_required(['workdir'])


def evaluate_checkpoint(config, workdir: str, checkpoint: str | None, split: str,
                        output: str | None) -> dict[str, float]:
  config = run_files.load_config(workdir, config)[0]
  dataset = pipeline.build_dataset(config, split=split, global_batch_size=config.eval_batch_size,
                                   shuffle_seed=0, train=False)
  detector = detectors.build(config, dataset.num_classes)
  step_dir, params = run_files.load_params(workdir, checkpoint, detector, config)
  output = output or os.path.join(workdir, 'eval', os.path.basename(step_dir))
  logger.info('Evaluating %s on %s: %d images', step_dir, split, dataset.num_examples)
  mesh = parallel.data_mesh()
  params = jax.device_put(params, parallel.replicated(mesh))
  metrics, per_category, summary, detections = predict.evaluate(detector, params, dataset, mesh,
                                                                config.eval_top_k)
  if jax.process_index() == 0:
    coco_eval.write_results(output, metrics, per_category, detections)
    print(f'{step_dir} on {split}:\n{summary}{coco_eval.format_per_category(per_category)}'
          f'wrote {os.path.join(output, "metrics.json")}, detections.json, per_category_ap.txt',
          flush=True)
  return metrics


def main(argv):
  del argv
  evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _SPLIT.value,
                      _OUTPUT.value)


if __name__ == '__main__':
  runtime.run_app(main)
