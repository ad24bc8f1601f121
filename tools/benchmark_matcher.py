"""Times the two Hungarian matchers side by side on DETR-sized problems.

Each case is a batch of images with 100 queries, 91 + 1 classes and targets padded to 100 boxes,
of which a given number are real; the timed function is the jitted matcher (costs + assignment)
as the train step calls it. Prints the median time per call of each solver and, with --json,
writes all figures.

  python tools/benchmark_matcher.py [--json PATH] [--repeats N]
"""
import json
import os
import platform
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from qna_detr.detectors.matcher import SOLVERS, HungarianMatcher
from qna_detr.utils import runtime

_JSON = flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per case (after one warm-up call).')
_BATCHES = flags.DEFINE_list('batches', ['2', '8', '32'], 'Batch sizes.')
_TARGETS = flags.DEFINE_list('targets', ['0', '10', '50', '100', 'random'],
                             "Real targets per image (of 100), or 'random' for 0..100 each.")

QUERIES = 100
NUM_CLASSES = 91
PADDED_TARGETS = 100


def make_problem(rng: np.random.Generator, batch: int, targets: str) -> tuple[dict, dict]:
  """Random predictions and padded targets; `targets` real boxes per image (or random)."""
  def boxes(*shape: int) -> np.ndarray:
    centers = rng.uniform(0.1, 0.9, (*shape, 2))
    sizes = rng.uniform(0.02, 0.4, (*shape, 2))
    return np.concatenate([centers, sizes], -1).astype(np.float32)

  counts = (rng.integers(0, PADDED_TARGETS + 1, batch) if targets == 'random'
            else np.full(batch, int(targets)))
  outputs = {'pred_logits': rng.normal(size=(batch, QUERIES, NUM_CLASSES + 1)),
             'pred_boxes': boxes(batch, QUERIES)}
  target_dict = {'boxes': boxes(batch, PADDED_TARGETS),
                 'labels': rng.integers(0, NUM_CLASSES, (batch, PADDED_TARGETS)),
                 'box_mask': np.arange(PADDED_TARGETS)[None, :] < counts[:, None]}
  to_device = lambda tree: jax.tree.map(jnp.asarray, tree)
  return to_device(outputs), to_device(target_dict)


def time_call(fn, *args, repeats: int) -> tuple[float, float]:
  """Returns (first call incl. compilation, median of `repeats` later calls) in seconds."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, float(np.median(times))


def main(argv: Sequence[str]) -> None:
  del argv
  rng = np.random.default_rng(0)
  matchers = {name: jax.jit(HungarianMatcher(solver=name)) for name in sorted(SOLVERS)}
  rows = []
  header = f"{'batch':>5} {'targets':>7} " + ' '.join(f'{n + " ms":>10}' for n in matchers)
  print(f'{jax.devices()[0].device_kind}, {jax.device_count()} device(s), '
        f'{platform.machine()} host with {os.cpu_count()} cores; '
        f'median of {_REPEATS.value} calls')
  print(header)
  for batch in map(int, _BATCHES.value):
    for targets in _TARGETS.value:
      outputs, target_dict = make_problem(rng, batch, targets)
      row = {'batch': batch, 'targets': targets}
      for name, matcher in matchers.items():
        first, median = time_call(matcher, outputs, target_dict, repeats=_REPEATS.value)
        row[name] = {'median_ms': 1e3 * median, 'first_call_ms': 1e3 * first}
      rows.append(row)
      print(f'{batch:>5} {targets:>7} ' +
            ' '.join(f'{row[n]["median_ms"]:>10.2f}' for n in matchers), flush=True)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'device': jax.devices()[0].device_kind, 'host_cores': os.cpu_count(),
                 'queries': QUERIES,
                 'padded_targets': PADDED_TARGETS, 'repeats': _REPEATS.value, 'cases': rows},
                f, indent=1)


if __name__ == '__main__':
  runtime.run_app(main)
