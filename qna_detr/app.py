"""The project's own Scenic-compatible entry point, for installs without Scenic.

Same flags and contract as `scenic.app.run`: `--config=FILE` (with `--config.KEY=VALUE`
overrides), `--workdir=DIR`; then `main(rng=, config=, workdir=, writer=)` with
rng = PRNGKey(config.rng_seed) and a CLU writer (TensorBoard files on process 0). Several
processes join through `jax.distributed` when --num_processes > 1.
"""
import functools
import os
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import jax
from ml_collections import config_flags
import tensorflow as tf

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work unit directory.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for runs over several processes.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1, 'Processes of a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'This process, in [0, num_processes).')
flags.mark_flags_as_required(['config', 'workdir'])


def _run_main(argv, *, main: Callable) -> None:
  del argv
  tf.config.set_visible_devices([], 'GPU')  # Keep TF off accelerators JAX needs.
  if _NUM_PROCESSES.value > 1:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if 'workdir_suffix' in config:
    workdir = os.path.join(workdir, config.workdir_suffix)
  logging.info('JAX process %d / %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  rng = jax.random.PRNGKey(config.rng_seed)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  main(rng=rng, config=config, workdir=workdir, writer=writer)


def run(main: Callable) -> None:
  jax.config.config_with_absl()
  app.run(functools.partial(_run_main, main=main))
