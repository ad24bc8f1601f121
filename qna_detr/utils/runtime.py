"""Process-wide settings that a run or a tool applies at its start.

- JAX's persistent compilation cache (`enable_compilation_cache`): a resumed run, a second
  tool or a rerun on the same shapes loads its programs instead of compiling them again.
- On a CPU, glibc's malloc keeps freed memory for reuse (`keep_freed_memory_on_cpu`). XLA's
  CPU runtime allocates and frees its large temporary buffers on every step, and glibc serves
  blocks above its mmap threshold with fresh mappings that it unmaps on free, so every step
  would fault in (and zero-fill) its working set page by page again. The process then holds
  its peak footprint between steps instead of returning it.
"""
import ctypes
import ctypes.util
import functools
import os

from absl import logging
import jax

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'qna_detr', 'jax')

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


def enable_compilation_cache(path: str = DEFAULT_CACHE_DIR) -> None:
  """Turns on JAX's persistent compilation cache in `path` ('' = leave it off)."""
  if path:
    jax.config.update('jax_compilation_cache_dir', path)
