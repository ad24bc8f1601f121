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


def compiled_stats(fn: Callable, *args: Any) -> dict[str, float]:
  """FLOPs (a multiply-add counts 2) and peak bytes of `jax.jit(fn)` on these arguments.

  Peak bytes = arguments + outputs + temporaries of the compiled program, the memory it needs
  while it runs (aliased arguments are not double-counted).
  """
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  return {'flops': float(cost.get('flops', 0.0)), 'peak_bytes': int(peak)}
