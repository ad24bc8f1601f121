"""The step loop shared by every training phase (the detector's, the backbone's dense
pretraining): steps from the state's own to the last, logging, checkpoints, periodic work.

Every `log_every` steps: the mean metrics, step time and images/s to the writer and one
console line (ETA from the steps after the first, which compiles). Every `checkpoint_every`
steps and at the end: the state (with the data iterator). A non-finite loss or gradient norm
stops the run (`NonFiniteLoss`) before anything after it is saved. SIGTERM (a cluster's
preemption) or a first Ctrl-C stops the run after the step in flight, its state saved
(`Stopped`; every process at the same step); a second Ctrl-C stops at once.
"""
from collections.abc import Callable, Sequence
import contextlib
import dataclasses
import logging
import math
import re
import signal
import threading
import time
from typing import Any, Optional

from clu import metric_writers
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import numpy as np

from qna_detr.train import checkpoints
from qna_detr.utils import checkpoint_io

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepLoop:
  """How `run_steps` runs: steps, intervals, and where it saves and logs."""
  total_steps: int
  batch_size: int  # Global; for images/s.
  log_every: int
  checkpoint_every: int
  checkpointer: checkpoints.Checkpointer
  writer: metric_writers.MetricWriter
  name: str = 'train'  # Prefix of the logged scalars' tags (none for 'train').
  # Called as callback(step, state) after the steps it is due, but not after the last one.
  periodic: Sequence[tuple[int, Callable[[int, Any], None]]] = ()


class NonFiniteLoss(FloatingPointError):
  """The loss or the gradient norm of a step is NaN or inf."""


class Stopped(RuntimeError):
  """The run stopped on a signal, its state saved; the same command resumes it."""


@contextlib.contextmanager
def _stop_requests():
  """{'signal': the name of SIGTERM or SIGINT once one arrived, else None} while the steps
  run; a second SIGINT raises KeyboardInterrupt at once. Handlers only in the main thread."""
  requested = {'signal': None}
  if threading.current_thread() is not threading.main_thread():
    yield requested
    return

  def handler(signum, frame):
    del frame
    if requested['signal'] is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    requested['signal'] = signal.Signals(signum).name
    logger.warning('%s: stopping after the step in flight, with a checkpoint (a second Ctrl-C '
                   'stops at once)', requested['signal'])

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield requested
  finally:
    for s, old in previous.items():
      signal.signal(s, old)


def _agreed(stop: bool) -> bool:
  """Whether any process was asked to stop (so that all stop at the same step)."""
  if jax.process_count() == 1:
    return stop
  return bool(np.any(multihost_utils.process_allgather(np.asarray(stop))))


def _stopped(loop: StepLoop, step: int, what: str) -> NonFiniteLoss:
  latest = loop.checkpointer.latest_step()
  last_good = (f'the last good checkpoint is {loop.checkpointer.directory}/{latest}'
               if latest is not None else 'no checkpoint was written yet')
  return NonFiniteLoss(f'{loop.name} step {step}: {what}; stopped, {last_good} (a lower '
                       'learning rate, or gradient clipping, may help)')


def _check_finite(history: Sequence[dict[str, Any]], first_step: int, loop: StepLoop) -> None:
  """Raises NonFiniteLoss naming the first step of `history` (host metrics of steps
  first_step, first_step + 1, ...) whose loss or gradient norm is not finite."""
  for offset, metrics in enumerate(history):
    values = {k: float(metrics[k]) for k in ('loss', 'grad_norm') if k in metrics}
    if not all(math.isfinite(v) for v in values.values()):
      raise _stopped(loop, first_step + offset, f'loss {values.get("loss")}, gradient norm '
                                                f'{values.get("grad_norm")}')


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


def _console_line(loop: StepLoop, step: int, scalars: dict[str, float], eta_s: float) -> str:
  """'train 120/6000  loss 6.412 (ce 1.103 bbox 0.402 giou 0.513)  lr head 4.0e-04 ...'."""
  parts = [k for k in scalars if k != 'loss' and not re.search(r'_\d+$', k)  # Aux layers.
           and not k.startswith('lr_') and k not in ('grad_norm', 'step_time_s', 'images_per_s')]
  terms = ' '.join(f'{k.removeprefix("loss_")} {scalars[k]:.4g}' for k in parts)
  rates = ' '.join(f'{k[3:]} {v:.1e}' for k, v in scalars.items() if k.startswith('lr_'))
  line = f'{loop.name} {step}/{loop.total_steps}  loss {scalars["loss"]:.4f}'
  line += f' ({terms})' if terms else ''
  line += f'  lr {rates}' if rates else ''
  if 'grad_norm' in scalars:
    line += f'  grad {scalars["grad_norm"]:.3g}'
  return line + f'  {scalars["images_per_s"]:.0f} img/s  ETA {_duration(eta_s)}'


def run_steps(step_fn: Callable, state: Any, next_batch: Callable[[], Any],
              iterator: Optional[Any], loop: StepLoop, mesh: jax.sharding.Mesh) -> Any:
  """Runs `step_fn` from the state's step to `loop.total_steps` (see the module doc);
  returns the last state."""
  start_step = int(state.step)
  prefix = '' if loop.name == 'train' else f'{loop.name}/'
  report = periodic_actions.ReportProgress(num_train_steps=loop.total_steps, writer=loop.writer,
                                           every_steps=loop.log_every, every_secs=None)
  history, last_log, compiled_at = [], (start_step, time.time()), None
  with jax.set_mesh(mesh), _stop_requests() as requested:
    for step in range(start_step + 1, loop.total_steps + 1):
      with jax.profiler.StepTraceAnnotation(loop.name, step_num=step):
        state, metrics = step_fn(state, next_batch())
      if compiled_at is None:  # Steps are timed from the end of the first one.
        jax.block_until_ready(metrics)
        compiled_at = (step, time.time())
      history.append(metrics)
      report(step)
      stop = _agreed(requested['signal'] is not None)
      last = step == loop.total_steps
      logs = step % loop.log_every == 0 or last
      saves = step % loop.checkpoint_every == 0 or last or stop
      if logs or saves:
        host = jax.device_get(history)
        _check_finite(host, step - len(host) + 1, loop)
      if logs:
        scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        now = time.time()
        seconds = (now - last_log[1]) / (step - last_log[0])
        scalars.update(step_time_s=seconds, images_per_s=loop.batch_size / seconds)
        loop.writer.write_scalars(step, {prefix + k: v for k, v in scalars.items()})
        rate = (step - compiled_at[0]) / max(now - compiled_at[1], 1e-9)
        eta = (loop.total_steps - step) / rate if step > compiled_at[0] else float('nan')
        logger.info(_console_line(loop, step, scalars, eta if math.isfinite(eta) else 0.0))
        history, last_log = [], (step, now)
      if saves:
        try:
          loop.checkpointer.save(step, state, iterator)
        except checkpoint_io.NonFiniteState as e:
          raise _stopped(loop, step, f'the parameters are no longer finite ({e})') from None
        logger.info('%s step %d: checkpoint %s/%d', loop.name, step,
                    loop.checkpointer.directory, step)
      if stop and not last:
        cause = requested['signal'] or 'another process was stopped'
        raise Stopped(f'{loop.name}: stopped at step {step} ({cause}); checkpoint '
                      f'{loop.checkpointer.directory}/{step}; rerun the same command to resume')
      for every, callback in loop.periodic:
        if step % every == 0 and not last:
          callback(step, state)
  return state
