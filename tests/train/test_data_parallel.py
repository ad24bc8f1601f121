"""Data parallelism: 8 simulated devices against 1, and two processes over jax.distributed.

Each runs in fresh interpreters: the device count and jax.distributed must be set up before
JAX starts.
"""
import importlib.util
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import pytest

import train_testing

pytestmark = pytest.mark.slow  # Subprocesses: the tools and the launcher.

ROOT = pathlib.Path(__file__).resolve().parents[2]

EIGHT_VERSUS_ONE = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    import train_testing
    from qna_detr import detectors, parallel
    from qna_detr.data import batching
    from qna_detr.train import optimizer, phases, train_step, trainer

    assert jax.device_count() == 8
    config = phases.prepare(train_testing.micro_config(sys.argv[1], batch_size=8), sys.argv[1])
    train_ds, _ = trainer.build_datasets(config)
    detector = detectors.build(config, train_ds.num_classes)
    frozen = train_step.frozen_mask(config, detector)
    tx, schedules = optimizer.build_optimizer(config, epoch_steps=10, total_steps=100,
                                              mask=frozen)
    batch = {k: v for k, v in next(iter(train_ds)).items() if k in detector.batch_keys}
    initial = train_step.initial_state(config, detector, tx, jax.random.PRNGKey(0),
                                train_ds.bucket_shapes[0])
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = parallel.data_mesh(devices)
      state = jax.device_put(jax.tree.map(np.asarray, initial), parallel.replicated(mesh))
      step = train_step.jit_step(config, detector, tx, schedules, frozen, mesh)
      with jax.set_mesh(mesh):
        arrays = batching.to_global_arrays(batch, parallel.batch_sharding(mesh))
        state, metrics = step(state, arrays)
      results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p8, m8) = results
    np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved = jax.tree.leaves(initial.params)
    assert any(not np.allclose(a, b) for a, b in zip(moved, jax.tree.leaves(p8)))
    try:
      phases.prepare(train_testing.micro_config(sys.argv[1], batch_size=12), sys.argv[1])
    except ValueError as e:
      assert 'config.batch_size=12' in str(e), e
    else:
      raise AssertionError('a batch of 12 on 8 devices was accepted')
    print('OK', float(m8['loss']))
''')


def _env(**extra):
  python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': python_path, **extra}


def test_eight_devices_equal_one(tmp_path):
  result = subprocess.run(
      [sys.executable, '-c', EIGHT_VERSUS_ONE, str(tmp_path / 'data'), str(ROOT / 'tests/train')],
      env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'),
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-4000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_over_jax_distributed(tmp_path):
  """The launcher on two processes (one CPU device each) trains and evaluates together, through
  Scenic's entry point where Scenic is importable, the project's otherwise."""
  scenic = (importlib.util.find_spec('scenic') is not None and
            importlib.util.find_spec('scenic.app') is not None)
  config_file = train_testing.write_config_file(tmp_path / 'micro_config.py',
                                                str(tmp_path / 'data'), steps=3)
  port = _free_port()
  workdir = tmp_path / 'run'
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / 'projects/qna_detr/main.py'), f'--config={config_file}',
       f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={i}'],
      env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
    assert f'Launcher: {"scenic" if scenic else "qna_detr"}' in err
  metrics = json.loads((workdir / 'metrics.json').read_text())
  assert set(metrics) >= {'AP', 'AP50', 'AR100'}
  # Both processes log the same global loss at every step: one program over both devices.
  losses = [re.findall(r'train \d/3  loss ([\d.]+)', err) for _, err in outputs]
  assert len(losses[0]) == 3 and losses[0] == losses[1]
