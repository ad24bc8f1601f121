"""Smoke test of tools/benchmark_qna.py on a tiny input: it runs and writes its JSON schema."""
import json
import os
import re
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, 'PYTHONPATH': f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}


@pytest.mark.slow  # End to end.
def test_writes_results_table_and_plot(tmp_path: pathlib.Path):
  json_path, plot_path = tmp_path / 'bench.json', tmp_path / 'bench.png'
  proc = subprocess.run(
      [sys.executable, str(REPO / 'tools' / 'benchmark_qna.py'), '--batch=1', '--height=9',
       '--width=11', '--channels=16', '--heads=4', '--windows=3,5', '--repeats=1',
       f'--json={json_path}', f'--plot={plot_path}'],
      env=ENV, capture_output=True, text=True, timeout=600, check=True)
  results = json.loads(json_path.read_text())['results']
  cases = {(r['layer'], r['window'], r['pass']) for r in results}
  # One QnA row per implementation, beside its peers.
  assert cases == {(layer, k, p) for layer in ('qna_slices', 'qna_conv', 'sasa', 'window', 'floor')
                   for k in (3, 5) for p in ('fwd', 'fwd_bwd')}
  assert all(r['median_s'] > 0 and r['peak_bytes'] > 0 and r['compile_s'] > 0 for r in results)
  assert 'compile s' in proc.stdout and 'qna/sasa t' in proc.stdout
  # Progress on the console: one line per case, with the ETA of the rest.
  assert len(re.findall(r'\[\d+/20\] \w+ k=\d \w+: median .* ETA \d+s', proc.stderr)) == 20
  assert plot_path.stat().st_size > 0


def test_imports_stay_light():
  """The tool runs on accelerator images without tensorflow, clu, pycocotools or
  ml_collections: importing it imports none of them."""
  heavy = ('tensorflow', 'clu', 'pycocotools', 'ml_collections')
  code = ('import sys; sys.path.insert(0, "tools"); import benchmark_qna; '
          f'print(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r})))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=300, check=True)
  assert proc.stdout.strip() == '[]'
