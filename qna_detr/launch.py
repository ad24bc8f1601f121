"""The entry point of a run: Scenic's launcher when Scenic is importable, the project's own
otherwise, with one set of flags and one meaning for each.

Both give `main(rng, config, workdir, writer)` the config of `--config=FILE` (with
`--config.KEY=VALUE` overrides), `--workdir` (joined with `config.workdir_suffix` if set),
rng = PRNGKey(config.rng_seed) and the project's TensorBoard writer (`utils.tensorboard`, on
process 0), and take:
  --coordinator_address, --num_processes, --process_id  join a run over several processes
      through `jax.distributed` (before JAX starts, whichever launcher runs);
  --compilation_cache_dir  JAX's persistent compilation cache ('' = off), so that a resumed
      run or a second tool does not compile again;
  --dataset_service_address  refused: the input pipeline does not use the tf.data service;
  -v / --verbosity  absl's: at 0 (INFO) other libraries' INFO lines show too.
With Scenic importable, the input pipeline is also registered in Scenic's dataset registry
(`data.scenic_dataset`). An error that stops the run is repeated as the console's last line.
"""
import functools
import logging
import os
import sys
from typing import Callable

from absl import app
from absl import flags
import jax

from qna_detr.data import scenic_dataset
from qna_detr.utils import runtime
from qna_detr.utils import tensorboard

FLAGS = flags.FLAGS
logger = logging.getLogger(__name__)

_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for runs over several processes.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'Processes of a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'This process, in [0, num_processes).')

if not scenic_dataset.available():  # Scenic's app defines these three itself.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py); '
                                  'override keys with --config.KEY=VALUE.', lock_config=False)
  flags.DEFINE_string('workdir', None, 'Work unit directory: checkpoints, logs, results.')
  flags.DEFINE_string('dataset_service_address', None,
                      'Address of a tf.data service (not supported: leave unset).')
  flags.mark_flags_as_required(['config', 'workdir'])


def _initialize() -> None:
  """After flag parsing, before either launcher touches JAX."""
  runtime.configure_logging()
  logger.info('Launcher: %s', launcher())
  if FLAGS.dataset_service_address:
    raise app.UsageError('--dataset_service_address: the qna_detr input pipeline does not use '
                         'the tf.data service; leave it unset.')
  if _NUM_PROCESSES.value > 1:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  runtime.enable_compilation_cache(runtime.CACHE_DIR.value)
  runtime.keep_freed_memory_on_cpu()


def _with_project_writer(main: Callable) -> Callable:
  """`main` given the project's writer (whatever the launcher made), and its error, if it
  fails, repeated as the last line of the console."""
  def run(*, rng, config, workdir, writer):
    if writer is not None:
      writer.close()  # Scenic's; ours writes scalars that every event reader finds.
    writer = tensorboard.create(workdir, jax.process_index() == 0)
    try:
      main(rng=rng, config=config, workdir=workdir, writer=writer)
    except Exception as e:
      runtime.report_error(e, 'The run stopped')
      sys.exit(1)
    finally:
      writer.close()
  return run


def _run_main(argv, *, main: Callable) -> None:
  """The project's launcher: what `scenic.app.run` does before calling `main`."""
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # Keep TF off accelerators JAX needs.
  config = FLAGS.config
  workdir = FLAGS.workdir
  if 'workdir_suffix' in config:
    workdir = os.path.join(workdir, config.workdir_suffix)
  logger.info('JAX process %d / %d, devices: %s', jax.process_index(), jax.process_count(),
              jax.devices())
  main(rng=jax.random.PRNGKey(config.rng_seed), config=config, workdir=workdir, writer=None)


def launcher() -> str:
  """'scenic' or 'qna_detr': which launcher `run` uses."""
  return 'scenic' if scenic_dataset.available() else 'qna_detr'


def flag_modules() -> list:
  """The modules defining the entry point's flags: an entry point adopts their key flags
  (`flags.adopt_module_key_flags`) so that its `--help` lists them."""
  modules = [sys.modules[__name__], runtime]
  if launcher() == 'scenic':
    from scenic import app as scenic_app  # pylint: disable=g-import-not-at-top
    modules.append(scenic_app)
  return modules


def run(main: Callable) -> None:
  """Runs a Scenic-style `main` under the launcher of `launcher()`; `--help` prints the
  entry point's doc and key flags and exits 0."""
  main = _with_project_writer(main)
  app.call_after_init(_initialize)
  if any(arg in ('--help', '-h', '-?', '--helpshort') for arg in sys.argv[1:]):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  if launcher() == 'scenic':
    from scenic import app as scenic_app  # pylint: disable=g-import-not-at-top
    runtime.run_with_flags(lambda: scenic_app.run(main))
    return
  jax.config.config_with_absl()
  runtime.run_with_flags(lambda: app.run(functools.partial(_run_main, main=main)))
