"""Times QnA against its local-attention peers, side by side on the same inputs.

Layers (all with the same channels and heads, and the same window size k):
  qna     QnA with its default 2 learned queries (window softmax as k x k window sums), one
          row per implementation in `--implementations`: qna_slices, qna_conv, ...;
  sasa    SASA, the QnA paper's baseline: every pixel attends its own k x k neighbourhood,
          with keys and values gathered per pixel;
  window  Swin-style self-attention in non-overlapping k x k windows;
  floor   the arithmetic QnA cannot avoid: its value, scores and output projections and one
          depthwise k x k convolution over the values (`QnAFloor`).

Each layer runs on one stride-4 feature map of a DETR-sized image (by default batch 2,
200 x 336, 64 channels) with an all-False padding mask passed as a runtime argument, as DETR
always passes one (and so no layer is specialized for an unpadded input). Passes: `fwd`, and
`fwd_bwd` = gradients of sum(output) w.r.t. the parameters and the input.

Time: `compile_s`, the seconds `jax.jit(step).lower(...).compile()` takes, apart from
`median_s`, the median wall time of the compiled call over `--repeats` calls after one warm-up
call; a case stops repeating early once its timed calls have taken `--budget_s`
(at least one timed call), so the defaults finish in minutes on a 2-core CPU, where the large-k
backward passes take tens of seconds a call.
Memory: `peak_bytes` = argument + output + temp bytes of the compiled executable's
`memory_analysis()` (`qna_detr.utils.xla_stats`; nothing is donated, so no bytes are aliased);
XLA's static buffer assignment, the same for every layer, not a measured process peak.

  python tools/benchmark_qna.py [--json PATH] [--plot PATH] [--windows 3,7] [--layers qna,sasa]
      [--implementations slices,conv]
"""
import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qna_detr.layers.qna import IMPLEMENTATIONS, QnA
from qna_detr.layers.sasa import SASA
from qna_detr.layers.window_attention import WindowAttention
from qna_detr.utils import runtime
from qna_detr.utils import xla_stats

Array = jax.Array

LAYERS = ('qna', 'sasa', 'window', 'floor')
PASSES = ('fwd', 'fwd_bwd')
QNA_PREFIX = 'qna_'  # A QnA row is named QNA_PREFIX + its implementation.

logger = logging.getLogger('qna_detr.tools.benchmark_qna')
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
# Off by default here: compile_s then measures a full compile.
flags.FLAGS.set_default('compilation_cache_dir', '')
_PLOT = flags.DEFINE_string('plot', None, 'Also plot time and memory against k to this PNG.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Batch size.')
_HEIGHT = flags.DEFINE_integer('height', 200, 'Feature map height (800 / stride 4).')
_WIDTH = flags.DEFINE_integer('width', 336, 'Feature map width (1344 / stride 4).')
_CHANNELS = flags.DEFINE_integer('channels', 64, 'Channels D, in and out.')
_HEADS = flags.DEFINE_integer('heads', 8, 'Attention heads of every layer.')
_WINDOWS = flags.DEFINE_list('windows', ['3', '5', '7', '9', '11'], 'Window sizes k (odd).')
_LAYERS = flags.DEFINE_list('layers', list(LAYERS), f'Layers to run, a subset of {LAYERS}.')
_IMPLEMENTATIONS = flags.DEFINE_list(
    'implementations', [name for name in IMPLEMENTATIONS if name != 'auto'],
    f'QnA implementations, one row each, a subset of {IMPLEMENTATIONS}.')
_PASSES = flags.DEFINE_list('passes', list(PASSES), f'Passes to run, a subset of {PASSES}.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per case, after one warm-up call.')
_BUDGET = flags.DEFINE_float('budget_s', 3.0,
                             'Stop repeating a case once its timed calls took this long.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the inputs and parameters.')


class QnAFloor(nn.Module):
  """What any QnA implementation must compute, as a yardstick for QnA's overhead.

  The value projection, the fused scores projection (D -> L * h), one element-wise use of the
  scores on the values (a per-head gate; it keeps the scores live), a depthwise k x k window
  sum over the D value channels (one learned k x k kernel per channel), and the output
  projection. QnA's softmax adds the exponentials, L window sums of D channels instead of one,
  the normalizer and the division on top of this.
  """
  features: int
  heads: int
  kernel_size: int
  num_queries: int = 2

  @nn.compact
  def __call__(self, x: Array, padding_mask: Optional[Array] = None) -> Array:
    del padding_mask  # Masking is part of QnA's overhead, not of the floor.
    spatial = x.shape[:3]
    scores = nn.Dense(self.num_queries * self.heads, use_bias=False, name='to_scores')(x)
    gate = scores.reshape(*spatial, self.num_queries, self.heads).sum(axis=3)
    values = nn.Dense(self.features, use_bias=False, name='to_v')(x)
    gated = (values.reshape(*spatial, self.heads, -1) * gate[..., None]).reshape(values.shape)
    summed = nn.Conv(self.features, (self.kernel_size, self.kernel_size), padding='SAME',
                     feature_group_count=self.features, use_bias=False,
                     name='window_sum')(gated)
    return nn.Dense(self.features, use_bias=False, name='to_out')(summed)


def row_names(layers: Sequence[str], implementations: Sequence[str]) -> list[str]:
  """The rows to run: each layer, with 'qna' as one row per implementation."""
  return [row for name in layers
          for row in ([QNA_PREFIX + i for i in implementations] if name == 'qna' else [name])]


def make_layer(name: str, features: int, heads: int, window: int) -> nn.Module:
  """The layer of row `name` (see `row_names`) at window size k = `window`."""
  if name.startswith(QNA_PREFIX):
    return QnA(features, heads, window, implementation=name.removeprefix(QNA_PREFIX))
  if name == 'sasa':
    return SASA(features, heads, window)
  if name == 'window':
    return WindowAttention(features, heads, window)
  if name == 'floor':
    return QnAFloor(features, heads, window)
  raise ValueError(f'Unknown layer {name!r}; choose from {LAYERS} (QnA as {QNA_PREFIX}*).')


def make_step(layer: nn.Module, pass_name: str) -> Callable:
  """(params, x, padding_mask) -> output ('fwd') or (param grads, input grad) ('fwd_bwd')."""
  def forward(params, x, padding_mask):
    return layer.apply(params, x, padding_mask)

  if pass_name == 'fwd':
    return forward
  if pass_name == 'fwd_bwd':
    return jax.grad(lambda *args: forward(*args).sum(), argnums=(0, 1))
  raise ValueError(f'Unknown pass {pass_name!r}; choose from {PASSES}.')


@dataclasses.dataclass
class Result:
  """One case's figures; `to_json` gives its --json record."""
  layer: str
  window: int
  pass_name: str
  median_s: float
  peak_bytes: int
  repeats: int
  compile_s: float

  def to_json(self) -> dict:
    return {'layer': self.layer, 'window': self.window, 'pass': self.pass_name,
            'median_s': self.median_s, 'peak_bytes': self.peak_bytes,
            'repeats': self.repeats, 'compile_s': self.compile_s}


def measure(step: Callable, args: tuple, repeats: int, budget_s: float
            ) -> tuple[float, int, int, float]:
  """(median seconds, peak bytes, timed calls, compile seconds) of jit(step)(*args)."""
  start = time.perf_counter()
  compiled = jax.jit(step).lower(*args).compile()
  compile_s = time.perf_counter() - start
  peak = xla_stats.stats_of(compiled)['peak_bytes']
  jax.block_until_ready(compiled(*args))  # Warm-up.
  times = []
  while len(times) < repeats and (not times or sum(times) < budget_s):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), int(peak), len(times), compile_s


def run_all(rows: Sequence[str], windows: Sequence[int], passes: Sequence[str]
            ) -> list[Result]:
  """Every (row, window, pass) case on the same input, logging progress and an ETA."""
  key_x, key_params = jax.random.split(jax.random.PRNGKey(_SEED.value))
  shape = (_BATCH.value, _HEIGHT.value, _WIDTH.value, _CHANNELS.value)
  x = jax.random.normal(key_x, shape, jnp.float32)
  padding_mask = jnp.zeros(shape[:3], bool)
  num_cases = len(windows) * len(rows) * len(passes)
  # Most of the cost grows with k^2; the ETA assumes it does.
  total_weight, done_weight = len(rows) * len(passes) * sum(k * k for k in windows), 0
  results = []
  start = time.perf_counter()
  for k in windows:
    for name in rows:
      layer = make_layer(name, _CHANNELS.value, _HEADS.value, k)
      # Parameter shapes do not depend on H x W: initialize on a small input.
      params = jax.jit(layer.init)(key_params, x[:1, :k, :k], padding_mask[:1, :k, :k])
      for pass_name in passes:
        case = f'[{len(results) + 1}/{num_cases}] {name} k={k} {pass_name}'
        logger.info('%s ...', case)
        median, peak, calls, compile_s = measure(make_step(layer, pass_name),
                                                 (params, x, padding_mask),
                                                 _REPEATS.value, _BUDGET.value)
        results.append(Result(name, k, pass_name, median, peak, calls, compile_s))
        done_weight += k * k
        elapsed = time.perf_counter() - start
        logger.info('%s: median %.3fs over %d, peak %.0f MiB, compile %.1fs; elapsed %.0fs, '
                     'ETA %.0fs', case, median, calls, peak / 2**20, compile_s, elapsed,
                     elapsed * (total_weight - done_weight) / done_weight)
  return results


def _ratio(a: Optional[Result], b: Optional[Result], field: str) -> str:
  if a is None or b is None:
    return '-'
  return f'{getattr(a, field) / getattr(b, field):.2f}'


def _rows(results: Sequence[Result]) -> list[str]:
  """The row names of `results`, in the order they ran."""
  return list(dict.fromkeys(r.layer for r in results))


def format_table(results: Sequence[Result]) -> str:
  """Per pass, window and row: time (s), peak memory (MiB), compile time (s), and for QnA
  rows their time and memory over SASA's and their time over the floor's."""
  index = {(r.layer, r.window, r.pass_name): r for r in results}
  lines = [f"{'pass':<8}{'k':>3}  {'layer':<12}{'time s':>9}{'peak MiB':>10}{'compile s':>11}"
           f"{'qna/sasa t':>12}{'qna/sasa mem':>14}{'qna/floor t':>13}"]
  for pass_name in PASSES:
    for k in sorted({r.window for r in results if r.pass_name == pass_name}):
      sasa, floor = index.get(('sasa', k, pass_name)), index.get(('floor', k, pass_name))
      for name in _rows(results):
        r = index.get((name, k, pass_name))
        if r is None:
          continue
        line = (f'{pass_name:<8}{k:>3}  {name:<12}{r.median_s:>9.3f}'
                f'{r.peak_bytes / 2**20:>10.0f}{r.compile_s:>11.1f}')
        if name.startswith(QNA_PREFIX):
          line += (f"{_ratio(r, sasa, 'median_s'):>12}{_ratio(r, sasa, 'peak_bytes'):>14}"
                   f"{_ratio(r, floor, 'median_s'):>13}")
        lines.append(line)
  return '\n'.join(lines)


def _met(ok: bool) -> str:
  return 'met' if ok else 'MISSED'


def format_goals(results: Sequence[Result]) -> str:
  """The project's goals for QnA, per implementation, each with what was measured (reported,
  never asserted; they are set for the platform's own implementation)."""
  index = {(r.layer, r.window, r.pass_name): r for r in results}
  lines = []
  sasa = index.get(('sasa', 7, 'fwd_bwd'))
  for name in _rows(results):
    qna = index.get((name, 7, 'fwd_bwd'))
    if name.startswith(QNA_PREFIX) and qna and sasa:
      speedup, saving = sasa.median_s / qna.median_s, sasa.peak_bytes / qna.peak_bytes
      lines.append(f'k=7 fwd_bwd: {name} {speedup:.2f}x faster than SASA (goal >= 5): '
                   f'{_met(speedup >= 5)}')
      lines.append(f'k=7 fwd_bwd: {name} {saving:.2f}x less peak memory than SASA '
                   f'(goal >= 10): {_met(saving >= 10)}')
  for r in results:
    floor = index.get(('floor', r.window, r.pass_name))
    if r.layer.startswith(QNA_PREFIX) and floor:
      ratio = r.median_s / floor.median_s
      lines.append(f"k={r.window} {r.pass_name}: {r.layer} {ratio:.2f}x its floor's time "
                   f'(goal <= 1.5): {_met(ratio <= 1.5)}')
  return '\n'.join(lines)


def plot(results: Sequence[Result], path: str, title: str) -> None:
  """Time and peak memory against k, one column per pass, one line per row (log scale)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  passes = [p for p in PASSES if any(r.pass_name == p for r in results)]
  fig, axes = plt.subplots(2, len(passes), figsize=(6 * len(passes), 8), squeeze=False)
  for col, pass_name in enumerate(passes):
    for name in _rows(results):
      rows = sorted((r for r in results if r.layer == name and r.pass_name == pass_name),
                    key=lambda r: r.window)
      if not rows:
        continue
      ks = [r.window for r in rows]
      axes[0, col].plot(ks, [r.median_s for r in rows], 'o-', label=name)
      axes[1, col].plot(ks, [r.peak_bytes / 2**20 for r in rows], 'o-', label=name)
    for row, ylabel in enumerate(('median time (s)', 'peak memory (MiB)')):
      ax = axes[row, col]
      ax.set_yscale('log')
      ax.set_xlabel('window size k')
      ax.set_ylabel(ylabel)
      ax.set_xticks(sorted({r.window for r in results}))
      ax.grid(True, which='both', alpha=0.3)
      ax.legend()
    axes[0, col].set_title(pass_name)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  del argv
  unknown = (set(_LAYERS.value) - set(LAYERS) | set(_PASSES.value) - set(PASSES)
             | set(_IMPLEMENTATIONS.value) - set(IMPLEMENTATIONS))
  if unknown:
    raise app.UsageError(f'Unknown layers, passes or implementations {sorted(unknown)}; layers '
                         f'are {LAYERS}, passes {PASSES}, implementations {IMPLEMENTATIONS}.')
  windows = [int(k) for k in _WINDOWS.value]
  if any(k < 1 or k % 2 == 0 for k in windows):
    raise app.UsageError(f'--windows must be positive odd integers, got {windows}.')
  if _REPEATS.value < 1:
    raise app.UsageError(f'--repeats must be >= 1, got {_REPEATS.value}.')

  start, start_cpu = time.perf_counter(), time.process_time()
  results = run_all(row_names(_LAYERS.value, _IMPLEMENTATIONS.value), windows, _PASSES.value)
  total_s, total_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
  device = jax.devices()[0]
  title = (f'{device.platform}: {device.device_kind} ({platform.machine()}, '
           f'{os.cpu_count()} cores); x = {_BATCH.value} x {_HEIGHT.value} x {_WIDTH.value} x '
           f'{_CHANNELS.value}, {_HEADS.value} heads')
  print(title)
  # CPU time next to wall time shows when other processes shared the machine.
  print(f'median of up to {_REPEATS.value} calls after a warm-up (budget {_BUDGET.value:g}s a '
        f'case); peak = argument + output + temp bytes of the compiled call; compile = '
        f'lower + compile; total {total_s:.0f}s wall, {total_cpu_s:.0f}s process CPU')
  print(format_table(results))
  goals = format_goals(results)
  if goals:
    print(goals)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'device': title.split(';')[0],
                 'input_shape': [_BATCH.value, _HEIGHT.value, _WIDTH.value, _CHANNELS.value],
                 'heads': _HEADS.value, 'total_s': total_s, 'total_cpu_s': total_cpu_s,
                 'results': [r.to_json() for r in results]}, f, indent=1)
  if _PLOT.value:
    plot(results, _PLOT.value, title)


if __name__ == '__main__':
  runtime.run_app(main)
