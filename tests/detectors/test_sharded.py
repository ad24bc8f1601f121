"""Matching and losses under sharding-based jit on 8 simulated devices.

Runs in a subprocess because the simulated device count must be set before JAX starts.
"""
import os
import pathlib
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from qna_detr.detectors.detr.losses import set_criterion
    from qna_detr.detectors.matcher import HungarianMatcher

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    batch, queries, slots, classes = 16, 10, 6, 5
    def layer():
      return {'pred_logits': rng.normal(size=(batch, queries, classes + 1)).astype(np.float32),
              'pred_boxes': rng.uniform(0.2, 0.8, (batch, queries, 4)).astype(np.float32)}
    outputs = {**layer(), 'aux_outputs': [layer()]}
    counts = rng.integers(0, slots + 1, batch)
    targets = {'boxes': rng.uniform(0.2, 0.8, (batch, slots, 4)).astype(np.float32),
               'labels': rng.integers(0, classes, (batch, slots)).astype(np.int32),
               'box_mask': np.arange(slots)[None] < counts[:, None]}
    # Per-image sums over the global box count: what the losses must add up to.
    per_image = [set_criterion(jax.tree.map(lambda x: x[i:i + 1], outputs),
                               jax.tree.map(lambda x: x[i:i + 1], targets),
                               HungarianMatcher())[1] for i in range(batch)]
    num_boxes = counts.sum()
    expected_bbox = sum(c['loss_bbox'] * max(n, 1) for c, n in zip(per_image, counts)) / num_boxes
    for solver in ('scipy', 'jax'):
      for batch_axis in (None, 'data'):
        matcher = HungarianMatcher(solver=solver, batch_axis=batch_axis)
        with jax.set_mesh(mesh):
          sharded = jax.device_put((outputs, targets), NamedSharding(mesh, P('data')))
          _, components = jax.jit(lambda o, t: set_criterion(o, t, matcher))(*sharded)
        np.testing.assert_allclose(components['loss_bbox'], expected_bbox, rtol=1e-5)
    print('OK')
''')


def test_global_normalization_under_sharding():
  root = str(pathlib.Path(__file__).resolve().parents[2])
  python_path = os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')]))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': python_path}
  result = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]
