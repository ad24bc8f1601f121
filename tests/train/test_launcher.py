"""projects/qna_detr/main.py through the project's own entry point, and through Scenic's.

Both take --config=FILE with --config.KEY=VALUE overrides and --workdir, train, checkpoint and
write WORKDIR/metrics.json. The Scenic run is skipped where Scenic is not importable.
"""
import importlib.util
import json
import os
import pathlib
import subprocess

import pytest

import train_testing

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config_file(tmp_path) -> pathlib.Path:
  return train_testing.write_config_file(tmp_path / 'micro_config.py', str(tmp_path / 'data'),
                                         steps=4)


def _run(script: str, args: list[str], extra_env=None) -> subprocess.CompletedProcess:
  result = train_testing.run_script(script, args, extra_env)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _launch(tmp_path, extra_env=None) -> pathlib.Path:
  workdir = tmp_path / 'run'
  _run('projects/qna_detr/main.py',
       [f'--config={_config_file(tmp_path)}', f'--workdir={workdir}',
        '--config.num_train_steps=3', '--config.checkpoint_every_steps=1000'], extra_env)
  return workdir


def _check_run(workdir: pathlib.Path) -> None:
  # The override (3 steps, checkpoint only at the end) reached the run.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  metrics = json.loads((workdir / 'metrics.json').read_text())
  assert list(metrics) == ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                           'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl']
  assert all(-1.0 <= v <= 1.0 for v in metrics.values())
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))


def test_own_entry_point_then_evaluate(tmp_path):
  workdir = _launch(tmp_path, {'QNA_DETR_DISABLE_SCENIC': '1'})
  _check_run(workdir)
  # tools/evaluate.py on the final checkpoint: the summary, the files, and twice the numbers
  # the training run wrote.
  trained = json.loads((workdir / 'metrics.json').read_text())
  for attempt in ('first', 'second'):
    output = tmp_path / attempt
    result = _run('tools/evaluate.py', [f'--config={_config_file(tmp_path)}',
                                        f'--workdir={workdir}', f'--output={output}'])
    assert result.stdout.count('Average Precision') == 6
    assert json.loads((output / 'metrics.json').read_text()) == trained
    detections = json.loads((output / 'detections.json').read_text())
    assert {d['category_id'] for d in detections} <= {1, 2, 3, 4, 5}
    assert (output / 'per_category_ap.txt').read_text().startswith('category')


@pytest.mark.skipif(importlib.util.find_spec('scenic') is None or
                    importlib.util.find_spec('scenic.app') is None,
                    reason='Scenic is not importable (it is not on PyPI; see the README)')
def test_scenic_entry_point(tmp_path):
  _check_run(_launch(tmp_path))
