"""Process-wide settings that a run or a tool applies at its start.

- A quiet console (`configure_logging`): the project's own lines (logger 'qna_detr'), one
  line each, on stderr; other libraries' INFO chatter (orbax, CLU, TensorFlow) off unless
  absl's `--verbosity` (`-v`) is given.
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
import logging
import os
import re
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'qna_detr', 'jax')
CACHE_DIR = flags.DEFINE_string('compilation_cache_dir', DEFAULT_CACHE_DIR,
                                "JAX's persistent compilation cache ('' = off).")

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
  logger.debug('Host allocator: freed memory kept for reuse: %s', applied)
  return applied


def enable_compilation_cache(path: str = DEFAULT_CACHE_DIR) -> None:
  """Turns on JAX's persistent compilation cache in `path` ('' = leave it off)."""
  if path:
    jax.config.update('jax_compilation_cache_dir', path)


class _Console(logging.Formatter):
  """'HH:MM:SS message', warnings and errors marked as such."""

  def format(self, record: logging.LogRecord) -> str:
    text = super().format(record)
    if record.levelno >= logging.WARNING:
      text = f'{record.levelname}: {text}'
    return f'{self.formatTime(record, "%H:%M:%S")} {text}'


def configure_logging() -> None:
  """The project's lines to stderr through one handler; absl's (and so orbax's and CLU's)
  down to warnings unless `--verbosity` was given."""
  project = logging.getLogger('qna_detr')
  if not any(isinstance(h.formatter, _Console) for h in project.handlers):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Console())
    project.addHandler(handler)
  project.setLevel(logging.INFO)
  project.propagate = False
  if not flags.FLAGS.is_parsed() or not flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


# What a user can act on (a config key, a file, a workdir, a stop, a diverged run): one ERROR
# line, the traceback only with --verbosity. Anything else is a bug: its traceback as well.
USER_ERRORS = (ValueError, OSError, RuntimeError, ArithmeticError, KeyError)


def report_error(error: BaseException, what: str) -> None:
  """The error as the console's last line, `ERROR: Type: message` (after its traceback for a
  bug, or with --verbosity)."""
  if not isinstance(error, USER_ERRORS) or flags.FLAGS['verbosity'].present:
    logger.error(what, exc_info=error)
  print(f'\nERROR: {type(error).__name__}: {error}', file=sys.stderr, flush=True)


def run_with_flags(run: Callable[[], None]) -> None:
  """`run()` (which parses the flags, e.g. `app.run(...)`), a flag that does not parse (an
  unknown `--config.KEY`: ml_collections suggests the right one) reported on one line."""
  try:
    run()
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = ' '.join(str(e).replace('\\n', ' ').replace('\\', '').split()).strip("'")
    text = re.sub(r"^'?([\w.]+)' (Did you mean)", r"no key '\1'. \2", text)
    print(f'\nERROR: a flag could not be parsed: {text}', file=sys.stderr, flush=True)
    sys.exit(2)


def _start_tool() -> None:
  configure_logging()
  enable_compilation_cache(CACHE_DIR.value)


def run_app(main: Callable) -> None:
  """`absl.app.run(main)` for the tools, with `--help` printing the tool's own flags and
  exiting 0, and the console and the compilation cache set up before `main` runs."""
  if any(arg in ('--help', '-h', '-?', '--helpshort') for arg in sys.argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  app.call_after_init(_start_tool)

  def run(argv):
    try:
      main(argv)
    except Exception as e:  # pylint: disable=broad-except
      report_error(e, 'The tool stopped')
      sys.exit(1)
  run_with_flags(lambda: app.run(run))
