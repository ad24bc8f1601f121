"""Parameters and FLOPs of a backbone variant, or of a whole detector from an experiment config.

  python tools/model_summary.py --backbone=qna_vit_tiny --num_classes=1000 --image_size=224
  python tools/model_summary.py --backbone=resnet50 --num_classes=0 --image_size=800,1216 --json
  python tools/model_summary.py --config=configs/dino_resnet50_coco.py --num_classes=91

For a backbone the rows list its top-level modules, then the classifier's own (its final norm
and head); they add up to the total. For a config the rows list the detector's top-level
modules; parameters leave out what the reference keeps as buffers (a ResNet's frozen batch
norms), and 'trainable' also leaves out what stays fixed in training (a ResNet's stem and
layer1, a frozen backbone): the figures torch's `parameters()` gives the references.
"""
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from qna_detr import backbones  # noqa: F401  (registers the backbones)
from qna_detr import detectors
from qna_detr.backbones import registry
from qna_detr.train import train_step
from qna_detr.utils import runtime
from qna_detr.utils import xla_stats

_BACKBONE = flags.DEFINE_enum('backbone', 'qna_vit_tiny', registry.names(), 'Backbone variant.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'An experiment config: summarize its whole detector instead.',
    lock_config=False)
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', 1000, 'Classification head size (a detector\'s object classes); 0 = the '
    'backbone\'s feature extractor only.')
_IMAGE_SIZE = flags.DEFINE_list('image_size', ['224'], 'S, or H,W.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch size for the FLOP count.')
_FLOPS = flags.DEFINE_bool('flops', True, 'Compile the forward pass for its FLOPs and peak '
                           'memory (--noflops: parameter counts alone).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')


def _image_shape() -> tuple[int, int]:
  sizes = [int(s) for s in _IMAGE_SIZE.value]
  if len(sizes) not in (1, 2) or min(sizes) < 1:
    raise app.UsageError(f'--image_size must be S or H,W with positive values, got '
                         f'{",".join(_IMAGE_SIZE.value)}.')
  return (sizes[0], sizes[-1])


def _costs(apply, params, image_shape, batch, flops: bool) -> dict:
  if not flops:
    return {}
  images = jnp.zeros((batch, *image_shape, 3), jnp.float32)
  stats = xla_stats.compiled_stats(apply, params, images)
  return {'flops': stats['flops'], 'peak_bytes': stats['peak_bytes']}


def summarize(name: str, num_classes: int, image_shape: tuple[int, int], batch: int,
              flops: bool = True) -> dict:
  model_config = {'backbone': name, 'dtype': 'float32'}
  if num_classes:
    model = registry.build_classifier(model_config, num_classes)
  else:
    model = registry.build(model_config)
  images = jnp.zeros((batch, *image_shape, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  groups = xla_stats.params_by_group(params['backbone'] if num_classes else params)
  if num_classes:  # The classifier's own modules after the backbone's.
    groups.update(xla_stats.params_by_group(
        {k: v for k, v in params.items() if k != 'backbone'}))
  summary = {
      'backbone': name, 'num_classes': num_classes, 'input_shape': [batch, *image_shape, 3],
      'params': xla_stats.count_params(params), 'params_by_module': groups,
      **_costs(lambda p, x: model.apply({'params': p}, x), params, image_shape, batch, flops)}
  released = registry.get(name).released_params
  if num_classes == 1000 and released:
    summary['released_params'] = released
  return summary


def _count(params, keep) -> int:
  """Scalars of the leaves `keep(path)` accepts."""
  return int(sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                 if keep(tuple(str(getattr(k, 'key', k)) for k in path))))


def summarize_detector(config, num_classes: int, image_shape: tuple[int, int], batch: int,
                       flops: bool = True) -> dict:
  """Parameters (without buffers), trainable ones, per top-level module, of the config's
  detector for `num_classes` classes."""
  detector = detectors.build(config, num_classes)
  params = detector.abstract_params()
  buffer = registry.get(config.model.backbone).buffer
  is_buffer = lambda path: path[0] == 'backbone' and buffer(path[1:])
  fixed = jax.tree_util.tree_leaves_with_path(train_step.frozen_mask(config, detector))
  fixed = {tuple(str(getattr(k, 'key', k)) for k in path) for path, f in fixed if f}
  return {
      'config': config.experiment_name, 'detector': config.model.name,
      'backbone': config.model.backbone, 'num_classes': num_classes,
      'input_shape': [batch, *image_shape, 3],
      'params': _count(params, lambda p: not is_buffer(p)),
      'trainable_params': _count(params, lambda p: not is_buffer(p) and p not in fixed),
      'buffers': _count(params, is_buffer),
      'params_by_module': {name: _count({name: sub}, lambda p: not is_buffer(p))
                           for name, sub in params.items()},
      **_costs(lambda p, x: detector.module.apply({'params': p}, x, jnp.zeros(x.shape[:3], bool),
                                                  train=False), params, image_shape, batch,
               flops)}


def _print_table(summary: dict) -> None:
  title = summary.get('config', summary['backbone'])
  print(f"{title}  input {'x'.join(map(str, summary['input_shape']))}  "
        f"classes {summary['num_classes']}")
  for module, count in summary['params_by_module'].items():
    print(f'  {module:<20} {count:>12,}')
  line = f"parameters {summary['params']:,} ({summary['params'] / 1e6:.3f}M)"
  if 'released_params' in summary:
    line += f"; released checkpoint: {summary['released_params'] / 1e6:.3f}M"
  if 'trainable_params' in summary:
    line += (f"; trainable {summary['trainable_params']:,}; buffers (not counted) "
             f"{summary['buffers']:,}")
  print(line)
  if 'flops' in summary:
    print(f"FLOPs {summary['flops'] / 1e9:.2f} G (XLA cost analysis; a multiply-add counts 2)")
    print(f"compiled peak memory {summary['peak_bytes'] / 2**20:.1f} MiB")


def main(argv):
  del argv
  if _CONFIG.value is not None:
    summary = summarize_detector(_CONFIG.value, _NUM_CLASSES.value, _image_shape(),
                                 _BATCH.value, _FLOPS.value)
  else:
    summary = summarize(_BACKBONE.value, _NUM_CLASSES.value, _image_shape(), _BATCH.value,
                        _FLOPS.value)
  if _JSON.value:
    print(json.dumps(summary))
  else:
    _print_table(summary)


if __name__ == '__main__':
  runtime.run_app(main)
