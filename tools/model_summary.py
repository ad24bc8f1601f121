"""Parameters and FLOPs of a backbone variant.

  python tools/model_summary.py --backbone=qna_vit_tiny --num_classes=1000 --image_size=224
  python tools/model_summary.py --backbone=resnet50 --num_classes=0 --image_size=800,1216 --json

The rows list the backbone's top-level modules, then the classifier's own (its final norm and
head); they add up to the total.
"""
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from qna_detr import backbones  # noqa: F401  (registers the backbones)
from qna_detr.backbones import registry
from qna_detr.utils import xla_stats
from qna_detr.utils import runtime

_BACKBONE = flags.DEFINE_enum('backbone', 'qna_vit_tiny', registry.names(), 'Backbone variant.')
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', 1000, 'Classification head size; 0 = feature extractor only.')
_IMAGE_SIZE = flags.DEFINE_list('image_size', ['224'], 'S, or H,W.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch size for the FLOP count.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')


def _image_shape() -> tuple[int, int]:
  sizes = [int(s) for s in _IMAGE_SIZE.value]
  if len(sizes) not in (1, 2) or min(sizes) < 1:
    raise app.UsageError(f'--image_size must be S or H,W with positive values, got '
                         f'{",".join(_IMAGE_SIZE.value)}.')
  return (sizes[0], sizes[-1])


def summarize(name: str, num_classes: int, image_shape: tuple[int, int], batch: int) -> dict:
  model_config = {'backbone': name, 'dtype': 'float32'}
  if num_classes:
    model = registry.build_classifier(model_config, num_classes)
  else:
    model = registry.build(model_config)
  images = jnp.zeros((batch, *image_shape, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  stats = xla_stats.compiled_stats(lambda p, x: model.apply({'params': p}, x), params, images)
  groups = xla_stats.params_by_group(params['backbone'] if num_classes else params)
  if num_classes:  # The classifier's own modules after the backbone's.
    groups.update(xla_stats.params_by_group(
        {k: v for k, v in params.items() if k != 'backbone'}))
  summary = {
      'backbone': name, 'num_classes': num_classes, 'input_shape': [batch, *image_shape, 3],
      'params': xla_stats.count_params(params), 'flops': stats['flops'],
      'peak_bytes': stats['peak_bytes'], 'params_by_module': groups,
  }
  released = registry.get(name).released_params
  if num_classes == 1000 and released:
    summary['released_params'] = released
  return summary


def _print_table(summary: dict) -> None:
  print(f"{summary['backbone']}  input {'x'.join(map(str, summary['input_shape']))}  "
        f"classes {summary['num_classes']}")
  for module, count in summary['params_by_module'].items():
    print(f'  {module:<20} {count:>12,}')
  line = f"parameters {summary['params']:,} ({summary['params'] / 1e6:.3f}M)"
  if 'released_params' in summary:
    line += f"; released checkpoint: {summary['released_params'] / 1e6:.3f}M"
  print(line)
  print(f"FLOPs {summary['flops'] / 1e9:.2f} G (XLA cost analysis; a multiply-add counts 2)")
  print(f"compiled peak memory {summary['peak_bytes'] / 2**20:.1f} MiB")


def main(argv):
  del argv
  summary = summarize(_BACKBONE.value, _NUM_CLASSES.value, _image_shape(), _BATCH.value)
  if _JSON.value:
    print(json.dumps(summary))
  else:
    _print_table(summary)


if __name__ == '__main__':
  runtime.run_app(main)
