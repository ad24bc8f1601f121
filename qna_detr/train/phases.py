"""A run's phases, in turn: what `projects/qna_detr/main.py` does with a config.

1. The toy set, where `config.toy_data` asks for it (`data.toy.prepare`): made once, then read
   as a COCO folder like any other.
2. The backbone's dense pretraining, where `config.backbone_pretraining.steps > 0`
   (`dense_pretraining.run`): its result becomes `config.pretrained.path`.
3. The detector's training and evaluation (`trainer.train_and_evaluate`), resumed from the
   workdir's checkpoint if it holds one (the earlier phases are then not needed again).
"""
import os
import tempfile

from clu import metric_writers
import jax
import ml_collections

from qna_detr import workdir as run_files
from qna_detr.data import toy
from qna_detr.train import config_checks
from qna_detr.train import dense_pretraining
from qna_detr.train import trainer


def _check_workdir(workdir: str) -> None:
  """The workdir exists or can be made, and takes files (before anything runs)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f'--workdir={workdir} is a file, not a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise PermissionError(f'--workdir={workdir} cannot be written ({e.strerror})') from None


def prepare(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The config checked, with the toy set's paths filled in where it uses one."""
  config = config_checks.check_config(config)
  dense_pretraining.check_config(config)
  _check_workdir(workdir)
  if (config.optimizer.freeze_backbone and not config.pretrained.path
      and config.backbone_pretraining.steps == 0 and not run_files.has_checkpoint(workdir)):
    raise ValueError('config.optimizer.freeze_backbone=True, but neither '
                     'config.pretrained.path nor config.backbone_pretraining.steps gives the '
                     'backbone weights: it would stay at its random initialization.')
  return toy.prepare(config, workdir)


def run(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str,
        writer: metric_writers.MetricWriter) -> dict[str, float]:
  """Runs the phases; returns the final COCO metrics. WORKDIR/config.json records the
  config, WORKDIR/run.lock keeps other runs out meanwhile (`qna_detr.workdir`)."""
  _check_workdir(workdir)
  with run_files.locked(workdir):
    config = prepare(config, workdir)
    trainer.check_resumable(config, workdir)  # Before config.json is written.
    run_files.save_config(workdir, config)
    writer.write_texts(0, {'config': f'```\n{config}\n```'})
    if config.backbone_pretraining.steps > 0 and not run_files.has_checkpoint(workdir):
      config.pretrained.path = dense_pretraining.run(config, workdir, writer)
    return trainer.train_and_evaluate(rng, config, workdir, writer)
