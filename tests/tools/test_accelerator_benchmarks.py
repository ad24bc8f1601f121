"""tools/accelerator_benchmarks.sh --cpu-smoke: the GPU check's own code at tiny sizes, in a
Python that cannot import TensorFlow, CLU or pycocotools (as on a CUDA machine image)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[2]
BLOCKER = '''
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ('tensorflow', 'clu', 'pycocotools'):
      raise ImportError(f'{name} is not installed on this machine image')
sys.meta_path.insert(0, _Missing())
'''


def test_cpu_smoke_writes_every_figure(tmp_path):
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(BLOCKER)
  env = {**os.environ, 'PYTHON': sys.executable, 'PYTHONPATH': str(site)}
  result = subprocess.run(['bash', str(ROOT / 'tools/accelerator_benchmarks.sh'), '--cpu-smoke',
                           '--out', str(tmp_path / 'out')], env=env, capture_output=True,
                          text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-4000:]
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert summary['environment']['backend'] == 'cpu'
  assert set(summary['train']) == {f'{c}_{d}' for c in ('qna_detr_tiny_coco',
                                                         'detr_resnet50_coco')
                                   for d in ('float32', 'bfloat16')}
  for figures in summary['train'].values():
    assert figures['images_per_s'] > 0 and figures['compile_s'] > 0
    assert figures['image_shape'] == [64, 96] and figures['batch_size'] == 2
  goals = summary['goals']
  assert {'qna_slices: <= 1.5x its floor at every k (fwd+bwd)',
          'qna_conv: <= 1.5x its floor at every k (fwd+bwd)',
          'QnA-ViT-T DETR >= DETR-R50 images/s (bfloat16)',
          'compile <= 60 s per shape'} <= set(goals)
  rows = json.loads((tmp_path / 'out' / 'qna.json').read_text())['results']
  assert {r['layer'] for r in rows} == {'qna_slices', 'qna_conv', 'sasa', 'window', 'floor'}
  assert all(r['compile_s'] > 0 and r['median_s'] > 0 for r in rows)
  assert set(summary['dino_vs_detr']) == {'dino_qna_vit_tiny_coco_512', 'qna_detr_tiny_coco_512'}
  assert all(f['median_step_s'] > 0 and f['peak_bytes'] > 0
             for f in summary['dino_vs_detr'].values())
  deformable = json.loads((tmp_path / 'out' / 'deformable.json').read_text())['results']
  assert {(r['case'], r['row'], r['pass']) for r in deformable} >= {
      (c, i, p) for c in ('encoder', 'decoder') for i in ('gather', 'dense')
      for p in ('fwd', 'fwd_bwd')}
  assert all(r['median_s'] > 0 for r in deformable if 'skipped' not in r)
