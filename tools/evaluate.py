"""Evaluates a checkpoint for COCO mAP with pycocotools.

  python tools/evaluate.py --config=configs/qna_detr_toy.py --workdir=/tmp/toy
  python tools/evaluate.py --config=... --workdir=... --checkpoint=/tmp/toy/checkpoints/500 \\
      --split=validation --output=/tmp/toy/eval

Prints pycocotools' 12-line summary and a per-category AP table; writes metrics.json,
detections.json (COCO results, original category ids) and per_category_ap.txt to --output
(default: the workdir).
"""
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from qna_detr import models
from qna_detr import parallel
from qna_detr.data import pipeline
from qna_detr.evaluation import coco_eval
from qna_detr.evaluation import inference
from qna_detr.train import checkpoints
from qna_detr.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run\'s workdir.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'A checkpoint step directory; default: the latest in workdir.')
_SPLIT = flags.DEFINE_enum('split', 'validation', ['validation', 'val', 'train'],
                           'Split of the config\'s dataset to evaluate.')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the results (default: workdir).')
flags.mark_flags_as_required(['config', 'workdir'])


def evaluate_checkpoint(config, workdir: str, checkpoint: str | None, split: str,
                        output: str) -> dict[str, float]:
  config = loop.resolve_config(config, workdir)
  step_dir = checkpoints.find(workdir, checkpoint)
  dataset = pipeline.build_dataset(config, split=split, global_batch_size=config.eval_batch_size,
                                   shuffle_seed=0, train=False)
  model = models.build_detr(config.model, dataset.num_classes)
  state = checkpoints.restore_state(step_dir, loop.abstract_state(config, model))
  logging.info('Evaluating %s (step %d) on %s: %d images', step_dir, int(state.step), split,
               dataset.num_examples)
  mesh = parallel.data_mesh()
  params = jax.device_put(state.eval_params, parallel.replicated(mesh))
  predict_fn = inference.make_predict_fn(model, config.eval_top_k)
  detections = inference.predict_dataset(predict_fn, params, dataset, mesh)
  metrics, per_category, summary = coco_eval.evaluate(dataset.coco_ground_truth(), detections)
  if jax.process_index() == 0:
    coco_eval.write_results(output, metrics, per_category, detections)
    print(f'{step_dir} on {split}:\n{summary}{coco_eval.format_per_category(per_category)}'
          f'wrote {os.path.join(output, "metrics.json")}, detections.json, per_category_ap.txt',
          flush=True)
  return metrics


def main(argv):
  del argv
  evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _SPLIT.value,
                      _OUTPUT.value or _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
