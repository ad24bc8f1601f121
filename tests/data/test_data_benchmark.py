"""tools/benchmark_input.py on a few images: its JSON figures."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_writes_its_figures(tmp_path):
  out = tmp_path / 'bench.json'
  subprocess.run(
      [sys.executable, os.path.join(REPO, 'tools', 'benchmark_input.py'), f'--json={out}',
       '--num_train=8', '--num_val=4', '--batch_size=2', '--num_batches=2', '--warmup_batches=1',
       '--sample_size=300', f'--workdir={tmp_path / "data"}'],
      check=True, env={**os.environ, 'PYTHONPATH': REPO}, timeout=300, capture_output=True)
  figures = json.loads(out.read_text())
  assert figures['images_per_s'] > 0
  assert 0 <= figures['padding_waste_bucketed'] < figures['padding_waste_square'] < 1
  assert 0 <= figures['eval_padding_waste_bucketed'] < figures['eval_padding_waste_square'] < 1
  assert figures['distinct_shapes'] == len(figures['bucket_shapes']) <= 8
  assert figures['eval_distinct_shapes'] == len(figures['eval_bucket_shapes']) <= 8
  assert 1 <= figures['distinct_shapes_seen'] <= figures['distinct_shapes']
