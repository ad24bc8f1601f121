"""Train-step speed and memory of an experiment config, on synthetic batches of a fixed shape.

  python tools/benchmark_train.py --config=configs/qna_detr_tiny_coco.py --image_size=800,1216
  python tools/benchmark_train.py --config=configs/qna_detr_toy.py --json=/tmp/train.json

Reports the compile time of the jitted step (`compile_s`, apart from the steps), the median
step time over --steps timed steps (after --warmup), images/s, and the compiled peak memory
and FLOPs, on all local devices. Imports no TensorFlow, CLU or pycocotools (it runs where only
JAX, flax, optax, orbax and ml_collections are installed).
"""
import json
import logging
import statistics
import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from qna_detr import detectors
from qna_detr import parallel
from qna_detr.train import optimizer
from qna_detr.train import train_step
from qna_detr.utils import runtime
from qna_detr.utils import xla_stats

logger = logging.getLogger('qna_detr.tools.benchmark_train')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=False)
_IMAGE_SIZE = flags.DEFINE_list(
    'image_size', [], 'H,W of the padded batch (default: the largest explicit train bucket, '
    'else the config\'s largest train scale and max size rounded up to 32).')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 80, 'Object classes (COCO: 80).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps first (the first one compiles).')
_JSON = flags.DEFINE_string('json', None, 'Write the figures to this JSON file.')
# Off by default here: compile_s then measures a full compile.
flags.FLAGS.set_default('compilation_cache_dir', '')
flags.mark_flag_as_required('config')


def _image_shape(config) -> tuple[int, int]:
  if _IMAGE_SIZE.value:
    height, width = (int(v) for v in _IMAGE_SIZE.value)
    return height, width
  if config.dataset.train_bucket_shapes:
    return tuple(max(config.dataset.train_bucket_shapes, key=lambda s: s[0] * s[1]))
  round_up = lambda v: -(-v // 32) * 32  # noqa: E731
  return round_up(max(config.dataset.train_scales)), round_up(config.dataset.train_max_size)


def synthetic_batch(batch_size: int, shape: tuple[int, int], num_classes: int,
                    max_boxes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random images (a quarter of the rows padded) with a few random boxes each."""
  rng = np.random.default_rng(seed)
  height, width = shape
  mask = np.zeros((batch_size, height, width), bool)
  mask[:, 3 * height // 4:] = True
  centers = rng.uniform(0.2, 0.8, (batch_size, max_boxes, 2))
  sizes = rng.uniform(0.05, 0.3, (batch_size, max_boxes, 2))
  return {
      'inputs': np.where(mask[..., None], 0, rng.normal(size=(batch_size, height, width, 3))
                         ).astype(np.float32),
      'padding_mask': mask,
      'boxes': np.concatenate([centers, sizes], -1).astype(np.float32),
      'labels': rng.integers(0, num_classes, (batch_size, max_boxes)).astype(np.int32),
      'box_mask': np.arange(max_boxes)[None] < rng.integers(1, max_boxes + 1, (batch_size, 1)),
  }


def benchmark(config, shape: tuple[int, int], num_classes: int, timed: int, warmup: int) -> dict:
  mesh = parallel.data_mesh(jax.local_devices())
  detector = detectors.build(config, num_classes)
  mask = train_step.frozen_mask(config, detector)
  tx, schedules = optimizer.build_optimizer(config, epoch_steps=1000, total_steps=75_000,
                                            mask=mask)
  state = jax.jit(lambda key: train_step.initial_state(config, detector, tx, key, shape),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  host_batch = synthetic_batch(config.batch_size, shape, num_classes, config.dataset.max_boxes)
  step_detector = detector
  if config.train_input == 'cached_features':  # The loop's step then reads features.
    pyramid = detector.backbone_features(jax.device_get(state.params['backbone']),
                                         host_batch['inputs'], host_batch['padding_mask'])
    host_batch.update(inputs=tuple(np.asarray(level.features) for level in pyramid),
                      padding_mask=tuple(np.asarray(level.mask) for level in pyramid))
    step_detector = detector.on_features()
  batch = jax.device_put(host_batch, parallel.batch_sharding(mesh))
  step_fn = train_step.jit_step(config, step_detector, tx, schedules, mask, mesh)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    compiled_stats = xla_stats.stats_of(compiled)
    times = []
    for i in range(warmup + timed):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      if i >= warmup:
        times.append(time.perf_counter() - start)
      logger.info('step %d/%d: %.3fs', i + 1, warmup + timed, time.perf_counter() - start)
  median = statistics.median(times)
  return {
      'config': config.experiment_name, 'backbone': config.model.backbone,
      'devices': f'{jax.local_device_count()} x {jax.local_devices()[0].device_kind}',
      'jax': jax.__version__, 'batch_size': config.batch_size, 'image_shape': list(shape),
      'dtype': config.model.dtype, 'compile_s': compile_s, 'median_step_s': median,
      'images_per_s': config.batch_size / median, 'peak_bytes': compiled_stats['peak_bytes'],
      'flops_per_step': compiled_stats['flops'], 'step_times_s': times,
  }


def main(argv):
  del argv
  runtime.keep_freed_memory_on_cpu()  # As training does.
  config = _CONFIG.value
  result = benchmark(config, _image_shape(config), _NUM_CLASSES.value, _STEPS.value,
                     _WARMUP.value)
  print(f"{result['config']} on {result['devices']}: batch {result['batch_size']} x "
        f"{result['image_shape'][0]}x{result['image_shape'][1]} ({result['dtype']})")
  print(f"compile {result['compile_s']:.1f} s; median step "
        f"{result['median_step_s'] * 1e3:.1f} ms over {len(result['step_times_s'])} steps, "
        f"{result['images_per_s']:.1f} images/s")
  print(f"compiled peak memory {result['peak_bytes'] / 2**30:.2f} GiB, "
        f"{result['flops_per_step'] / 1e12:.2f} TFLOP per step (XLA cost analysis)")
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  runtime.run_app(main)
