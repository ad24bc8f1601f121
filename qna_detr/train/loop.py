"""train_and_evaluate: the whole run behind `projects/qna_detr/main.py`.

Data parallel over every device of every process; resumes from the workdir's latest
checkpoint (train state and data iterator); logs losses, learning rates, gradient norm, step
time and images/s to the CLU writer; evaluates with pycocotools every `eval_every_epochs` and
at the end, writing WORKDIR/metrics.json.
"""
from collections.abc import Callable
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import ml_collections

from qna_detr import models
from qna_detr import parallel
from qna_detr.backbones import pretrained
from qna_detr.backbones import registry
from qna_detr.data import batching
from qna_detr.data import pipeline
from qna_detr.detr import HungarianMatcher, LossWeights
from qna_detr.evaluation import coco_eval
from qna_detr.evaluation import inference
from qna_detr.train import checkpoints
from qna_detr.train import dense_pretraining
from qna_detr.train import feature_cache
from qna_detr.train import optimizer
from qna_detr.train import steps


def resolve_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Checks the keys a run cannot start without, and fills workdir-relative defaults."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.backbone not in registry.names():
    raise ValueError(f'config.model.backbone={config.model.backbone!r} is not a registered '
                     f'backbone; choose one of {registry.names()}.')
  models.compute_dtype(config.model.dtype)
  if not 1 <= config.eval_top_k <= config.model.num_queries:
    raise ValueError(f'config.eval_top_k={config.eval_top_k} must be in [1, '
                     f'config.model.num_queries={config.model.num_queries}].')
  if config.cache_backbone_features and not config.optimizer.freeze_backbone:
    raise ValueError('config.cache_backbone_features needs config.optimizer.freeze_backbone: '
                     'the features of a backbone that trains change every step.')
  if not 0 <= config.ema_decay < 1:
    raise ValueError(f'config.ema_decay={config.ema_decay} must be in [0, 1) (0: no average).')
  parallel.check_batch_size(config.batch_size, 'config.batch_size')
  parallel.check_batch_size(config.eval_batch_size, 'config.eval_batch_size')
  pretraining = config.backbone_pretraining
  if pretraining.steps > 0 and config.pretrained.path:
    raise ValueError('config.backbone_pretraining.steps > 0 and config.pretrained.path are both '
                     'set: the backbone starts either from a checkpoint or from its own dense '
                     'pretraining; set one.')
  if pretraining.steps > 0 and not 0 <= pretraining.warmup_steps < pretraining.steps:
    raise ValueError(f'config.backbone_pretraining.warmup_steps={pretraining.warmup_steps} must '
                     f'be in [0, config.backbone_pretraining.steps={pretraining.steps}).')
  if pretraining.edge_weight < 0:
    raise ValueError(f'config.backbone_pretraining.edge_weight={pretraining.edge_weight} must '
                     'be >= 0 (0: class maps only).')
  if config.dataset.name == 'toy' and not config.dataset.data_dir:
    config.dataset.data_dir = os.path.join(workdir, 'toy_coco')
  return config


def build_datasets(config: ml_collections.ConfigDict):
  train_ds = pipeline.build_dataset(config, split='train', global_batch_size=config.batch_size,
                                    shuffle_seed=config.rng_seed, train=True)
  val_ds = pipeline.build_dataset(config, split='val', global_batch_size=config.eval_batch_size,
                                  shuffle_seed=0, train=False)
  return train_ds, val_ds


def build_matcher(config: ml_collections.ConfigDict) -> HungarianMatcher:
  m = config.matcher
  return HungarianMatcher(cost_class=m.cost_class, cost_bbox=m.cost_bbox, cost_giou=m.cost_giou,
                          solver=m.solver, batch_axis=parallel.BATCH_AXIS)


def jit_train_step(config: ml_collections.ConfigDict, model, tx, schedules,
                   mesh: jax.sharding.Mesh):
  """The train step, jitted for a replicated state and a batch split over `mesh`."""
  replicated = parallel.replicated(mesh)
  step = steps.make_train_step(model, tx, build_matcher(config), LossWeights(**config.loss),
                               schedules, config.optimizer.freeze_backbone, config.ema_decay)
  return jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def batch_source(config: ml_collections.ConfigDict, model, params, iterator, first_step: int,
                 sharding: jax.sharding.Sharding) -> tuple[Callable[[], dict], Any]:
  """(next global batch, the step's model) for the steps from `first_step` on: the training
  iterator's batches through `model`, or, with config.cache_backbone_features, batches of
  cached backbone features through `model` minus its backbone."""
  if not config.cache_backbone_features:
    return lambda: batching.next_global_batch(iterator, sharding, steps.BATCH_KEYS), model
  images = pipeline.build_dataset(config, split='train', shuffle_seed=0, train=False,
                                  global_batch_size=config.eval_batch_size)
  cache = feature_cache.build(model, jax.device_get(params[optimizer.BACKBONE]), images)
  batches = feature_cache.batches(cache, first_step, config.batch_size // jax.process_count(),
                                  config.rng_seed)
  return (lambda: batching.to_global_arrays(next(batches), sharding),
          feature_cache.head_model(model))


def create_state(config: ml_collections.ConfigDict, model, tx, key: jax.Array,
                 image_shape: tuple[int, int]) -> steps.TrainState:
  """The initial train state of this config (with a moving average if it keeps one)."""
  return steps.create_state(model, tx, key, image_shape, ema=config.ema_decay > 0)


def abstract_state(config: ml_collections.ConfigDict, model) -> steps.TrainState:
  """The train state's shapes and dtypes, computed without running: what a checkpoint of
  this config restores into (`checkpoints.restore_state`)."""
  tx, _ = optimizer.build_optimizer(config, epoch_steps=1, total_steps=1)
  return jax.eval_shape(lambda key: create_state(config, model, tx, key, (64, 64)),
                        jax.random.PRNGKey(0))


def evaluate(predict_fn, params, dataset, mesh) -> tuple[dict, dict, str, list]:
  detections = inference.predict_dataset(predict_fn, params, dataset, mesh)
  metrics, per_category, summary = coco_eval.evaluate(dataset.coco_ground_truth(), detections)
  return metrics, per_category, summary, detections


def train_and_evaluate(rng: jax.Array, config: ml_collections.ConfigDict, workdir: str,
                       writer: metric_writers.MetricWriter) -> dict[str, float]:
  """Trains, checkpoints, evaluates; returns the final COCO metrics."""
  config = resolve_config(config, workdir)
  mesh = parallel.data_mesh()
  train_ds, val_ds = build_datasets(config)
  model = models.build_detr(config.model, train_ds.num_classes)
  epoch_steps = optimizer.steps_per_epoch(train_ds.num_examples, config.batch_size)
  total_steps = config.num_train_steps if config.num_train_steps > 0 else (
      config.num_epochs * epoch_steps)
  eval_every = max(1, round(config.eval_every_epochs * epoch_steps))
  tx, schedules = optimizer.build_optimizer(config, epoch_steps, total_steps)
  logging.info('%d training examples, %d classes; %d steps of %d images (%d per epoch) on %d '
               'devices', train_ds.num_examples, train_ds.num_classes, total_steps,
               config.batch_size, epoch_steps, jax.device_count())
  if config.optimizer.freeze_backbone:
    logging.info('Backbone frozen: the train step runs no backward pass through it')

  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  state = jax.jit(lambda key: create_state(config, model, tx, key, train_ds.bucket_shapes[0]),
                  out_shardings=replicated)(rng)
  checkpointer = checkpoints.Checkpointer(workdir, config.keep_checkpoints)
  # With cached features a step's batch follows from the step number: no input state.
  iterator = None if config.cache_backbone_features else iter(train_ds.tf_dataset)
  if checkpointer.latest_step() is not None:
    state = checkpointer.restore(state, iterator=iterator)
    logging.info('Resumed from step %d in %s', int(state.step), workdir)
  else:
    path = config.pretrained.path
    if config.backbone_pretraining.steps > 0:
      path = dense_pretraining.pretrain_backbone(config, train_ds, mesh, workdir, writer)
    if path:
      params, _ = pretrained.load_backbone(jax.device_get(state.params), path,
                                           config.pretrained.format)
      state = state.with_params(jax.device_put(params, replicated))
  start_step = int(state.step)
  next_batch, step_model = batch_source(config, model, state.params, iterator, start_step + 1,
                                        batch_sharding)
  train_step = jit_train_step(config, step_model, tx, schedules, mesh)
  predict_fn = inference.make_predict_fn(model, config.eval_top_k)

  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_secs=60)
  history, last_log = [], (start_step, time.time())
  with jax.set_mesh(mesh):
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = train_step(state, next_batch())
      history.append(metrics)
      report(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = steps.mean_metrics(history)
        seconds = (time.time() - last_log[1]) / (step - last_log[0])
        scalars.update(step_time_s=seconds, images_per_s=config.batch_size / seconds)
        writer.write_scalars(step, scalars)
        history, last_log = [], (step, time.time())
      if step % config.checkpoint_every_steps == 0 or step == total_steps:
        checkpointer.save(step, state, iterator)
      if step % eval_every == 0 and step != total_steps:
        metrics, _, summary, _ = evaluate(predict_fn, state.eval_params, val_ds, mesh)
        logging.info('step %d validation:\n%s', step, summary)
        writer.write_scalars(step, {f'val/{k}': v for k, v in metrics.items()})
  checkpointer.close()

  metrics, per_category, summary, detections = evaluate(predict_fn, state.eval_params, val_ds,
                                                        mesh)
  writer.write_scalars(total_steps, {f'val/{k}': v for k, v in metrics.items()})
  writer.flush()
  if jax.process_index() == 0:
    coco_eval.write_results(workdir, metrics, per_category, detections)
    print(summary + coco_eval.format_per_category(per_category), flush=True)
  return metrics

