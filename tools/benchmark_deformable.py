"""Times multi-scale deformable sampling, each formulation side by side on the same inputs.

Cases (batch 1 by default, 8 heads of 32 channels, 4 points per level):
  encoder  every token of DINO's four levels for an 800 x 1216 image (strides 8-64: 100 x 152,
           50 x 76, 25 x 38, 13 x 19 = 20,197 tokens) samples the levels;
  decoder  900 queries (DINO's) sample the same levels.
Rows: each formulation of `qna_detr.layers.deformable_attention.sample` ('gather', 'dense'),
and Scenic's Deformable DETR sampling (`deform_attn_sampling_fn`, with and without its remat)
when `scenic` is importable (a fetched checkout on PYTHONPATH). Passes: `fwd`, and `fwd_bwd`
= gradients of sum(output^2) w.r.t. values, locations and weights.

Time: `compile_s`, apart from `median_s`, the median of the compiled call over `--repeats`
calls after one warm-up call (stopping early once the timed calls took `--budget_s`).
Memory: `peak_bytes`, XLA's buffer assignment (arguments + outputs + temporaries). A case
whose compiled program needs more than `--max_gib` is reported, not run.

  python tools/benchmark_deformable.py [--json PATH] [--cases encoder,decoder] [--scale 0.25]
"""
import json
import logging
import statistics
import time
from collections.abc import Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from qna_detr.layers import deformable_attention as da
from qna_detr.utils import runtime
from qna_detr.utils import xla_stats

logger = logging.getLogger('qna_detr.tools.benchmark_deformable')
IMAGE = (800, 1216)
STRIDES = (8, 16, 32, 64)
CASES = {'encoder': None, 'decoder': 900}  # Queries: None = every token.
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
flags.FLAGS.set_default('compilation_cache_dir', '')  # compile_s measures a full compile.
_CASES = flags.DEFINE_list('cases', list(CASES), f'Cases, a subset of {list(CASES)}.')
_SCALE = flags.DEFINE_float('scale', 1.0, 'Image side scale (0.1 for a quick CPU check).')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch size.')
_HEADS = flags.DEFINE_integer('heads', 8, 'Heads M.')
_DEPTH = flags.DEFINE_integer('depth', 32, 'Channels per head D.')
_POINTS = flags.DEFINE_integer('points', 4, 'Sampling points per head and level P.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Values\' dtype.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per case, after one warm-up call.')
_BUDGET = flags.DEFINE_float('budget_s', 5.0, 'Stop repeating once the timed calls took this.')
_MAX_GIB = flags.DEFINE_float('max_gib', 12.0, 'Skip programs that need more than this.')


def level_shapes(scale: float) -> tuple[tuple[int, int], ...]:
  """DINO's levels of a scaled 800 x 1216 image: strides 8, 16, 32 (ceil), then stride-2
  convolutions (ceil) for stride 64."""
  height, width = (max(64, int(round(s * scale))) for s in IMAGE)
  shapes = [(-(-height // s), -(-width // s)) for s in STRIDES[:3]]
  shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
  return tuple(shapes)


def _scenic_rows() -> dict[str, Callable]:
  """Scenic's sampling, adapted to `da.sample`'s layout, if Scenic is importable."""
  try:
    from scenic.projects.baselines.deformable_detr import attention  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}

  def scenic(remat: bool):
    def sample(value, shapes, locations, weights):
      batch, length, heads, depth = value.shape
      queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
      v = value.transpose(0, 2, 1, 3).reshape(batch * heads, length, depth)
      loc = locations.transpose(0, 2, 3, 4, 1, 5).reshape(batch * heads, levels,
                                                          points * queries, 2)
      w = weights.transpose(0, 2, 1, 3, 4).reshape(batch * heads, queries, levels * points)
      out = attention.deform_attn_sampling_fn(v, loc, w, tuple(shapes), use_remat=remat,
                                              mode='map')
      return out.reshape(batch, heads, queries, depth).transpose(0, 2, 1, 3).reshape(
          batch, queries, heads * depth)
    return sample
  return {'scenic': scenic(False), 'scenic_remat': scenic(True)}


def _rows() -> dict[str, Callable]:
  rows = {impl: (lambda impl: lambda v, s, l, w: da.sample(v, s, l, w, impl))(impl)
          for impl in da.IMPLEMENTATIONS if impl != 'auto'}
  return {**rows, **_scenic_rows()}


def _inputs(shapes, queries: int | None, seed: int = 0):
  rng = np.random.default_rng(seed)
  length = sum(h * w for h, w in shapes)
  queries = queries or length
  batch, heads, depth, points = _BATCH.value, _HEADS.value, _DEPTH.value, _POINTS.value
  value = jnp.asarray(rng.normal(size=(batch, length, heads, depth)), _DTYPE.value)
  locations = jnp.asarray(rng.uniform(-0.05, 1.05, (batch, queries, heads, len(shapes), points,
                                                    2)), jnp.float32)
  weights = jax.nn.softmax(jnp.asarray(rng.normal(size=(batch, queries, heads,
                                                        len(shapes) * points)), jnp.float32))
  return value, locations, weights.reshape(batch, queries, heads, len(shapes), points)


def _time(compiled, args) -> tuple[float, list[float]]:
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
    if sum(times) >= _BUDGET.value:
      break
  return statistics.median(times), times


def run_case(name: str, shapes, queries: int | None) -> list[dict]:
  args = _inputs(shapes, queries)
  results = []
  for row, sample in _rows().items():
    forward = lambda v, l, w, sample=sample: sample(v, shapes, l, w)
    fwd_bwd = jax.grad(lambda v, l, w: (forward(v, l, w).astype(jnp.float32) ** 2).sum(),
                       argnums=(0, 1, 2))
    for passes, fn in (('fwd', forward), ('fwd_bwd', fwd_bwd)):
      start = time.perf_counter()
      compiled = jax.jit(fn).lower(*args).compile()
      compile_s = time.perf_counter() - start
      peak = xla_stats.stats_of(compiled)['peak_bytes']
      result = {'case': name, 'row': row, 'pass': passes, 'queries': int(args[1].shape[1]),
                'tokens': int(args[0].shape[1]), 'compile_s': compile_s, 'peak_bytes': peak}
      if peak > _MAX_GIB.value * 2**30:
        result['skipped'] = f'needs {peak / 2**30:.1f} GiB (--max_gib={_MAX_GIB.value})'
      else:
        result['median_s'], result['times_s'] = _time(compiled, args)
      logger.info('%s %s %s: %s, peak %.2f GiB, compile %.1fs', name, row, passes,
                  f'{result["median_s"] * 1e3:.1f} ms' if 'median_s' in result else
                  result['skipped'], peak / 2**30, compile_s)
      results.append(result)
  return results


def main(argv):
  del argv
  runtime.keep_freed_memory_on_cpu()
  shapes = level_shapes(_SCALE.value)
  results = []
  for name in _CASES.value:
    if name not in CASES:
      raise flags.ValidationError(f'--cases: {name!r} is not one of {list(CASES)}')
    queries = CASES[name]
    if queries is not None:
      queries = max(1, int(round(queries * min(1.0, _SCALE.value ** 2)))) if (
          _SCALE.value < 1) else queries
    results += run_case(name, shapes, queries)
  print(f'levels {shapes}, batch {_BATCH.value}, {_HEADS.value} heads x {_DEPTH.value}, '
        f'{_POINTS.value} points, {_DTYPE.value}, on {jax.devices()[0].device_kind}')
  print(f'{"case":<8} {"row":<13} {"pass":<8} {"median ms":>10} {"peak MiB":>9} '
        f'{"compile s":>9}')
  for r in results:
    median = f'{r["median_s"] * 1e3:10.1f}' if 'median_s' in r else f'{"skipped":>10}'
    print(f'{r["case"]:<8} {r["row"]:<13} {r["pass"]:<8} {median} '
          f'{r["peak_bytes"] / 2**20:9.0f} {r["compile_s"]:9.1f}')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'levels': shapes, 'batch': _BATCH.value, 'heads': _HEADS.value,
                 'depth': _DEPTH.value, 'points': _POINTS.value, 'dtype': _DTYPE.value,
                 'jax': jax.__version__, 'device': jax.devices()[0].device_kind,
                 'results': results}, f, indent=1)


if __name__ == '__main__':
  runtime.run_app(main)
