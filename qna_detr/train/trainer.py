"""Training a detector: `train_and_evaluate`.

Data parallel over every device of every process; resumes from the workdir's newest intact
checkpoint (train state and data iterator); logs through the step loop (`step_loop`);
evaluates with pycocotools every `eval_every_epochs` (None: at the end only) and at the end,
writing WORKDIR/metrics.json. Knows no detector: it talks to the `DetectorDef` its registry
builds.
"""
import logging
import time

from clu import metric_writers
import jax
import ml_collections

from qna_detr import detectors
from qna_detr import parallel
from qna_detr import workdir as run_files
from qna_detr.backbones import weights
from qna_detr.data import pipeline
from qna_detr.evaluation import coco_eval
from qna_detr.evaluation import pictures
from qna_detr.evaluation import predict
from qna_detr.train import checkpoints
from qna_detr.train import config_checks
from qna_detr.train import inputs
from qna_detr.train import optimizer
from qna_detr.train import step_loop
from qna_detr.train import train_step

logger = logging.getLogger(__name__)


def build_datasets(config: ml_collections.ConfigDict):
  train_ds = pipeline.build_dataset(config, split='train', global_batch_size=config.batch_size,
                                    shuffle_seed=config.rng_seed, train=True)
  val_ds = pipeline.build_dataset(config, split='val', global_batch_size=config.eval_batch_size,
                                  shuffle_seed=0, train=False)
  return train_ds, val_ds


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses, before anything in the workdir changes, a config whose train state does not fit
  the workdir's newest checkpoint (a run started with other sizes)."""
  if not run_files.has_checkpoint(workdir):
    return
  _, dataset = run_files.load_config(workdir)
  if 'class_names' not in dataset:
    return
  detector = detectors.build(config, len(dataset['class_names']))
  states = checkpoints.checkpoint_dir(workdir)
  try:
    steps = states.complete_steps()
    if steps:
      states.check_fits(steps[-1], train_step.abstract_state(config, detector))
  finally:
    states.close()


def load_pretrained(state: train_step.TrainState, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh) -> train_step.TrainState:
  """The state with its backbone from `config.pretrained.path`, if set. Weights that leave
  backbone tensors missing or unexpected (another variant's) are refused, unless
  `config.pretrained.allow_partial` says a partial load is meant."""
  if not config.pretrained.path:
    return state
  params = weights.load_pretrained_backbone(jax.device_get(state.params), config)
  return state.with_params(jax.device_put(params, parallel.replicated(mesh)))


def _evaluation(detector: detectors.DetectorDef, config: ml_collections.ConfigDict, val_ds,
                mesh: jax.sharding.Mesh, writer: metric_writers.MetricWriter):
  """(step, state) -> (metrics, per category, summary, detections) of the validation split,
  written to the writer and the console."""
  def evaluate(step: int, state: train_step.TrainState) -> tuple[dict, dict, str, list]:
    start = time.time()
    result = predict.evaluate(detector, state.eval_params, val_ds, mesh, config.eval_top_k)
    metrics = result[0]
    # pycocotools' -1: no ground truth in that range (e.g. no large objects); not a value.
    writer.write_scalars(step, {f'val/{k}': v for k, v in metrics.items() if v >= 0})
    if jax.process_index() == 0:
      writer.write_images(step, {f'val/pictures/{i}': picture for i, picture in
                                 enumerate(pictures.validation_pictures(val_ds, result[3]))})
    logger.info('train step %d: validation AP %.4f, AP50 %.4f, AP75 %.4f, AR100 %.4f (%d '
                'images, %.0fs)', step, metrics['AP'], metrics['AP50'], metrics['AP75'],
                metrics['AR100'], val_ds.num_examples, time.time() - start)
    return result
  return evaluate


def train_and_evaluate(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str,
                       writer: metric_writers.MetricWriter) -> dict[str, float]:
  """Trains, checkpoints, evaluates; returns the final COCO metrics."""
  config = config_checks.check_config(config)
  mesh = parallel.data_mesh()
  train_ds, val_ds = build_datasets(config)
  run_files.save_dataset(workdir, train_ds, val_ds)
  detector = detectors.build(config, train_ds.num_classes)
  epoch_steps = optimizer.steps_per_epoch(train_ds.num_examples, config.batch_size)
  total_steps = config.num_train_steps if config.num_train_steps > 0 else (
      config.num_epochs * epoch_steps)
  mask = train_step.frozen_mask(config, detector)
  tx, schedules = optimizer.build_optimizer(config, epoch_steps, total_steps, mask)
  logger.info('%d training examples, %d classes; %d steps of %d images (%d per epoch) on %d '
              'devices', train_ds.num_examples, train_ds.num_classes, total_steps,
              config.batch_size, epoch_steps, jax.device_count())
  if config.optimizer.freeze_backbone:
    logger.info('Backbone frozen: the train step runs no backward pass through it')

  state = jax.jit(lambda key: train_step.initial_state(config, detector, tx, key,
                                                      train_ds.bucket_shapes[0]),
                  out_shardings=parallel.replicated(mesh))(rng)
  checkpointer = checkpoints.Checkpointer(workdir, config.keep_checkpoints)
  source = inputs.build(config, detector, train_ds)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state, iterator=source.iterator)
    logger.info('Resumed from step %d in %s', int(state.step), workdir)
  else:
    state = load_pretrained(state, config, mesh)
  next_batch, step_detector = source.start(state.params, int(state.step) + 1,
                                           parallel.batch_sharding(mesh))
  step_fn = train_step.jit_step(config, step_detector, tx, schedules, mask, mesh)

  evaluate = _evaluation(detector, config, val_ds, mesh, writer)
  periodic = []
  if config.eval_every_epochs is not None:
    periodic.append((max(1, round(config.eval_every_epochs * epoch_steps)), evaluate))
  loop = step_loop.StepLoop(total_steps=total_steps, batch_size=config.batch_size,
                            log_every=config.log_every_steps,
                            checkpoint_every=config.checkpoint_every_steps,
                            checkpointer=checkpointer, writer=writer, periodic=periodic)
  try:
    state = step_loop.run_steps(step_fn, state, next_batch, source.iterator, loop, mesh)
  finally:
    checkpointer.close()

  metrics, per_category, summary, detections = evaluate(total_steps, state)
  writer.flush()
  if jax.process_index() == 0:
    coco_eval.write_results(workdir, metrics, per_category, detections)
    print(summary + coco_eval.format_per_category(per_category), flush=True)
  return metrics
