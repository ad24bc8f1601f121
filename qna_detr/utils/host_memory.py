"""Host allocator settings for training on CPUs.

XLA's CPU runtime allocates and frees its large temporary buffers on every step. glibc serves
allocations above its mmap threshold with fresh mappings and unmaps them on free, so every
step faults in (and zero-fills) its working set page by page again: over a quarter of the toy
run's CPU time went to the kernel. Keeping freed memory in the heap lets the next step reuse
it; the process then holds its peak footprint instead of returning it between steps.

Blocks larger than a per-thread arena's heap (64 MiB) are still mapped when a worker thread's
arena serves them (seen in a toy run's DETR phase after the backbone pretraining); one arena
for all threads (MALLOC_ARENA_MAX=1) avoids that, but its lock made the steps slower still.
"""
import ctypes
import ctypes.util
import functools

from absl import logging
import jax

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
# The same settings as glibc reads them from the environment at a process's start (for
# subprocesses, which the call below cannot reach).
ENVIRONMENT = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(_INT_MAX)}


@functools.cache
def keep_freed_memory_on_cpu() -> bool:
  """When JAX computes on the CPU, makes glibc's malloc keep freed memory for reuse.

  Every allocation is then served from the heap, which is never trimmed: both settings are
  needed (without mmaps the heap's top is still trimmed on free; without the trim threshold
  large blocks are still mapped). Process-wide and irreversible. Returns whether applied: not
  on accelerators, whose step buffers are not host memory, nor without glibc.
  """
  if jax.default_backend() != 'cpu':
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
  logging.info('Host allocator: freed memory kept for reuse: %s', applied)
  return applied
