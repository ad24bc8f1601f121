"""Sizes and costs read off XLA's compiled programs, shared by the summary and benchmark tools."""
from typing import Any, Callable

import jax
import numpy as np


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or shape structs."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def params_by_group(params: Any) -> dict[str, int]:
  """Parameter counts per top-level module of a Flax parameter dict."""
  return {name: count_params(sub) for name, sub in params.items()}


def stats_of(compiled: jax.stages.Compiled) -> dict[str, float]:
  """FLOPs (a multiply-add counts 2) and peak bytes of a compiled program.

  Peak bytes = arguments + outputs + temporaries, the memory the program needs while it runs
  (donated/aliased buffers are not double-counted).
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  return {'flops': float(cost.get('flops', 0.0)), 'peak_bytes': int(peak)}


def compiled_stats(fn: Callable, *args: Any) -> dict[str, float]:
  """`stats_of` the program `jax.jit(fn)` compiles for these arguments."""
  return stats_of(jax.jit(fn).lower(*args).compile())
