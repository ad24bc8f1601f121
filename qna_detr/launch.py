"""The entry point of a run: Scenic's launcher when Scenic is importable, the project's own
otherwise, with one set of flags and one meaning for each.

Both give `main(rng, config, workdir, writer)` the config of `--config=FILE` (with
`--config.KEY=VALUE` overrides), `--workdir` (joined with `config.workdir_suffix` if set),
rng = PRNGKey(config.rng_seed) and a CLU writer (TensorBoard files on process 0), and take:
  --coordinator_address, --num_processes, --process_id  join a run over several processes
      through `jax.distributed` (before JAX starts, whichever launcher runs);
  --compilation_cache_dir  JAX's persistent compilation cache ('' = off), so that a resumed
      run or a second tool does not compile again;
  --dataset_service_address  refused: the input pipeline does not use the tf.data service;
  -v / --verbosity  absl's: at 0 (INFO) other libraries' INFO lines show too.
With Scenic importable, the input pipeline is also registered in Scenic's dataset registry
(`data.scenic_dataset`).
"""
import functools
import os
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax

from qna_detr.data import scenic_dataset
from qna_detr.utils import runtime

FLAGS = flags.FLAGS

_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for runs over several processes.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'Processes of a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'This process, in [0, num_processes).')
_CACHE_DIR = flags.DEFINE_string('compilation_cache_dir', runtime.DEFAULT_CACHE_DIR,
                                 "JAX's persistent compilation cache ('' = off).")

if not scenic_dataset.available():  # Scenic's app defines these three itself.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                  lock_config=False)
  flags.DEFINE_string('workdir', None, 'Work unit directory.')
  flags.DEFINE_string('dataset_service_address', None, 'Address of the tf.data service.')
  flags.mark_flags_as_required(['config', 'workdir'])


def _initialize() -> None:
  """After flag parsing, before either launcher touches JAX."""
  if FLAGS.dataset_service_address:
    raise app.UsageError('--dataset_service_address: the qna_detr input pipeline does not use '
                         'the tf.data service; leave it unset.')
  if _NUM_PROCESSES.value > 1:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  runtime.enable_compilation_cache(_CACHE_DIR.value)
  runtime.keep_freed_memory_on_cpu()


def _run_main(argv, *, main: Callable) -> None:
  """The project's launcher: what `scenic.app.run` does before calling `main`."""
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # Keep TF off accelerators JAX needs.
  config = FLAGS.config
  workdir = FLAGS.workdir
  if 'workdir_suffix' in config:
    workdir = os.path.join(workdir, config.workdir_suffix)
  logging.info('JAX process %d / %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  rng = jax.random.PRNGKey(config.rng_seed)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  main(rng=rng, config=config, workdir=workdir, writer=writer)


def launcher() -> str:
  """'scenic' or 'qna_detr': which launcher `run` uses."""
  return 'scenic' if scenic_dataset.available() else 'qna_detr'


def run(main: Callable) -> None:
  """Runs a Scenic-style `main` under the launcher of `launcher()`."""
  app.call_after_init(_initialize)
  if launcher() == 'scenic':
    from scenic import app as scenic_app  # pylint: disable=g-import-not-at-top
    scenic_app.run(main)
    return
  jax.config.config_with_absl()
  app.run(functools.partial(_run_main, main=main))
