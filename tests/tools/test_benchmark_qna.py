"""Smoke test of tools/benchmark_qna.py on a tiny input: it runs and writes its JSON schema."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_writes_results_table_and_plot(tmp_path: pathlib.Path):
  json_path, plot_path = tmp_path / 'bench.json', tmp_path / 'bench.png'
  env = {**os.environ, 'PYTHONPATH': f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}
  proc = subprocess.run(
      [sys.executable, str(REPO / 'tools' / 'benchmark_qna.py'), '--batch=1', '--height=9',
       '--width=11', '--channels=16', '--heads=4', '--windows=3,5', '--repeats=1',
       f'--json={json_path}', f'--plot={plot_path}'],
      env=env, capture_output=True, text=True, timeout=600, check=True)
  results = json.loads(json_path.read_text())['results']
  cases = {(r['layer'], r['window'], r['pass']) for r in results}
  assert cases == {(layer, k, p) for layer in ('qna', 'sasa', 'window', 'floor')
                   for k in (3, 5) for p in ('fwd', 'fwd_bwd')}
  assert all(r['median_s'] > 0 and r['peak_bytes'] > 0 for r in results)
  assert 'qna/sasa t' in proc.stdout and plot_path.stat().st_size > 0
