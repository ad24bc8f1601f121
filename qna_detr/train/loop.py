"""Training a detector: the config checks, the step loop and `train_and_evaluate`.

Data parallel over every device of every process; resumes from the workdir's newest intact
checkpoint (train state and data iterator); logs losses, learning rates, gradient norm, step
time and images/s to the writer and the console; evaluates with pycocotools every
`eval_every_epochs` and at the end, writing WORKDIR/metrics.json. `run_steps` is the step
loop, shared with the backbone's dense pretraining.
"""
from collections.abc import Callable, Sequence
import dataclasses
import logging
import math
import os
import re
import time
from typing import Any, Optional

from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections
import numpy as np

from qna_detr import detectors
from qna_detr import parallel
from qna_detr.backbones import base
from qna_detr.backbones import registry as backbones
from qna_detr.backbones import weights
from qna_detr.data import pipeline
from qna_detr.evaluation import coco_eval
from qna_detr.evaluation import pictures
from qna_detr.evaluation import predict
from qna_detr.layers import qna
from qna_detr.train import checkpoints
from qna_detr.train import inputs
from qna_detr.train import optimizer
from qna_detr.train import train_step
from qna_detr.train import workdir as run_files
from qna_detr.utils import checkpoint_io

logger = logging.getLogger(__name__)


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config`, checked for what a run cannot start without; errors name the key."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.name not in detectors.names():
    raise ValueError(f'config.model.name={config.model.name!r} is not a registered detector; '
                     f'choose one of {detectors.names()}.')
  backbones.get(config.model.backbone)
  base.compute_dtype(config.model.dtype)
  if config.model.get('qna_implementation', 'auto') not in qna.IMPLEMENTATIONS:
    raise ValueError(f'config.model.qna_implementation={config.model.qna_implementation!r} '
                     f'is not one of {qna.IMPLEMENTATIONS}.')
  _check_numbers(config)
  if not 1 <= config.eval_top_k <= config.model.num_queries:
    raise ValueError(f'config.eval_top_k={config.eval_top_k} must be in [1, '
                     f'config.model.num_queries={config.model.num_queries}].')
  if config.train_input not in inputs.SOURCES:
    raise ValueError(f'config.train_input must be one of {sorted(inputs.SOURCES)}, got '
                     f'{config.train_input!r}.')
  if config.train_input == 'cached_features' and not config.optimizer.freeze_backbone:
    raise ValueError("config.train_input='cached_features' needs "
                     'config.optimizer.freeze_backbone: the features of a backbone that trains '
                     'change every step.')
  if not 0 <= config.ema_decay < 1:
    raise ValueError(f'config.ema_decay={config.ema_decay} must be in [0, 1) (0: no average).')
  parallel.check_batch_size(config.batch_size, 'config.batch_size')
  parallel.check_batch_size(config.eval_batch_size, 'config.eval_batch_size')
  return config


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  """Rates, intervals and sizes that would fail late (or train backwards) if wrong."""
  opt = config.optimizer
  rules = [('optimizer.lr', opt.lr >= 0, '>= 0'),
           ('optimizer.backbone_lr', opt.backbone_lr >= 0, '>= 0'),
           ('optimizer.weight_decay', opt.weight_decay >= 0, '>= 0'),
           ('optimizer.grad_clip_norm', opt.grad_clip_norm > 0, '> 0'),
           ('log_every_steps', config.log_every_steps >= 1, '>= 1'),
           ('checkpoint_every_steps', config.checkpoint_every_steps >= 1, '>= 1'),
           ('keep_checkpoints', config.keep_checkpoints >= 1, '>= 1'),
           ('eval_every_epochs', config.eval_every_epochs > 0, '> 0')]
  for key, ok, rule in rules:
    if not ok:
      value = config
      for part in key.split('.'):
        value = value[part]
      raise ValueError(f'config.{key}={value} must be {rule}.')
  if config.model.num_queries < config.dataset.max_boxes:
    raise ValueError(f'config.model.num_queries={config.model.num_queries} is below '
                     f'config.dataset.max_boxes={config.dataset.max_boxes}: every box of an '
                     'image must be matched to a query of its own.')


def build_datasets(config: ml_collections.ConfigDict):
  train_ds = pipeline.build_dataset(config, split='train', global_batch_size=config.batch_size,
                                    shuffle_seed=config.rng_seed, train=True)
  val_ds = pipeline.build_dataset(config, split='val', global_batch_size=config.eval_batch_size,
                                  shuffle_seed=0, train=False)
  return train_ds, val_ds


@dataclasses.dataclass
class StepLoop:
  """How `run_steps` runs: steps, intervals, and where it saves and logs."""
  total_steps: int
  batch_size: int  # Global; for images/s.
  log_every: int
  checkpoint_every: int
  checkpointer: checkpoints.Checkpointer
  writer: metric_writers.MetricWriter
  name: str = 'train'  # Prefix of the logged scalars' tags (none for 'train').
  # Called as callback(step, state) after the steps it is due, but not after the last one.
  periodic: Sequence[tuple[int, Callable[[int, Any], None]]] = ()


class NonFiniteLoss(FloatingPointError):
  """The loss or the gradient norm of a step is NaN or inf."""


def _stopped(loop: StepLoop, step: int, what: str) -> NonFiniteLoss:
  latest = loop.checkpointer.latest_step()
  last_good = (f'the last good checkpoint is {loop.checkpointer.directory}/{latest}'
               if latest is not None else 'no checkpoint was written yet')
  return NonFiniteLoss(f'{loop.name} step {step}: {what}; stopped, {last_good} (a lower '
                       'learning rate, or gradient clipping, may help)')


def _check_finite(history: Sequence[dict[str, Any]], first_step: int, loop: StepLoop) -> None:
  """Raises NonFiniteLoss naming the first step of `history` (host metrics of steps
  first_step, first_step + 1, ...) whose loss or gradient norm is not finite."""
  for offset, metrics in enumerate(history):
    values = {k: float(metrics[k]) for k in ('loss', 'grad_norm') if k in metrics}
    if not all(math.isfinite(v) for v in values.values()):
      raise _stopped(loop, first_step + offset, f'loss {values.get("loss")}, gradient norm '
                                                f'{values.get("grad_norm")}')


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


def _console_line(loop: StepLoop, step: int, scalars: dict[str, float], eta_s: float) -> str:
  """'train 120/6000  loss 6.412 (ce 1.103 bbox 0.402 giou 0.513)  lr head 4.0e-04 ...'."""
  parts = [k for k in scalars if k != 'loss' and not re.search(r'_\d+$', k)  # Aux layers.
           and not k.startswith('lr_') and k not in ('grad_norm', 'step_time_s', 'images_per_s')]
  terms = ' '.join(f'{k.removeprefix("loss_")} {scalars[k]:.4g}' for k in parts)
  rates = ' '.join(f'{k[3:]} {v:.1e}' for k, v in scalars.items() if k.startswith('lr_'))
  line = f'{loop.name} {step}/{loop.total_steps}  loss {scalars["loss"]:.4f}'
  line += f' ({terms})' if terms else ''
  line += f'  lr {rates}' if rates else ''
  if 'grad_norm' in scalars:
    line += f'  grad {scalars["grad_norm"]:.3g}'
  return line + f'  {scalars["images_per_s"]:.0f} img/s  ETA {_duration(eta_s)}'


def run_steps(step_fn: Callable, state: Any, next_batch: Callable[[], Any],
              iterator: Optional[Any], loop: StepLoop, mesh: jax.sharding.Mesh) -> Any:
  """Runs `step_fn` from the state's step to `loop.total_steps`; returns the last state.

  Every `log_every` steps: the mean metrics, step time and images/s to the writer and one
  console line (ETA from the steps after the first, which compiles). Every
  `checkpoint_every` steps and at the end: the state (with `iterator`). A non-finite loss
  or gradient norm stops the run (NonFiniteLoss) before anything after it is saved.
  """
  start_step = int(state.step)
  prefix = '' if loop.name == 'train' else f'{loop.name}/'
  report = periodic_actions.ReportProgress(num_train_steps=loop.total_steps, writer=loop.writer,
                                           every_steps=loop.log_every, every_secs=None)
  history, last_log, compiled_at = [], (start_step, time.time()), None
  with jax.set_mesh(mesh):
    for step in range(start_step + 1, loop.total_steps + 1):
      with jax.profiler.StepTraceAnnotation(loop.name, step_num=step):
        state, metrics = step_fn(state, next_batch())
      if compiled_at is None:  # Steps are timed from the end of the first one.
        jax.block_until_ready(metrics)
        compiled_at = (step, time.time())
      history.append(metrics)
      report(step)
      last = step == loop.total_steps
      logs, saves = step % loop.log_every == 0 or last, step % loop.checkpoint_every == 0 or last
      if logs or saves:
        host = jax.device_get(history)
        _check_finite(host, step - len(host) + 1, loop)
      if logs:
        scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        now = time.time()
        seconds = (now - last_log[1]) / (step - last_log[0])
        scalars.update(step_time_s=seconds, images_per_s=loop.batch_size / seconds)
        loop.writer.write_scalars(step, {prefix + k: v for k, v in scalars.items()})
        rate = (step - compiled_at[0]) / max(now - compiled_at[1], 1e-9)
        eta = (loop.total_steps - step) / rate if step > compiled_at[0] else float('nan')
        logger.info(_console_line(loop, step, scalars, eta if math.isfinite(eta) else 0.0))
        history, last_log = [], (step, now)
      if saves:
        try:
          loop.checkpointer.save(step, state, iterator)
        except checkpoint_io.NonFiniteState as e:
          raise _stopped(loop, step, f'the parameters are no longer finite ({e})') from None
        logger.info('%s step %d: checkpoint %s/%d', loop.name, step,
                    loop.checkpointer.directory, step)
      for every, callback in loop.periodic:
        if step % every == 0 and not last:
          callback(step, state)
  return state


def load_pretrained(state: train_step.TrainState, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh) -> train_step.TrainState:
  """The state with its backbone from `config.pretrained.path`, if set."""
  if not config.pretrained.path:
    return state
  params, _ = weights.load_backbone(jax.device_get(state.params), config.pretrained.path,
                                    config.pretrained.format, config.model.backbone)
  return state.with_params(jax.device_put(params, parallel.replicated(mesh)))


def train_and_evaluate(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str,
                       writer: metric_writers.MetricWriter) -> dict[str, float]:
  """Trains, checkpoints, evaluates; returns the final COCO metrics."""
  config = check_config(config)
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

  eval_every = max(1, round(config.eval_every_epochs * epoch_steps))
  loop = StepLoop(total_steps=total_steps, batch_size=config.batch_size,
                  log_every=config.log_every_steps,
                  checkpoint_every=config.checkpoint_every_steps, checkpointer=checkpointer,
                  writer=writer, periodic=[(eval_every, evaluate)])
  try:
    state = run_steps(step_fn, state, next_batch, source.iterator, loop, mesh)
  finally:
    checkpointer.close()

  metrics, per_category, summary, detections = evaluate(total_steps, state)
  writer.flush()
  if jax.process_index() == 0:
    coco_eval.write_results(workdir, metrics, per_category, detections)
    print(summary + coco_eval.format_per_category(per_category), flush=True)
  return metrics


def has_checkpoint(workdir: str) -> bool:
  """Whether the workdir holds a training checkpoint (a run to resume)."""
  directory = os.path.join(workdir, checkpoints.SUBDIR)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
