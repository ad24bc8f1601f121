"""projects/qna_detr/main.py through the project's own entry point, and through Scenic's.

Both take --config=FILE with --config.KEY=VALUE overrides and --workdir, train, checkpoint and
write WORKDIR/metrics.json. The Scenic run is skipped where Scenic is not importable.
"""
import importlib.util
import json
import os
import pathlib
import re
import subprocess

import pytest
from tensorboard.backend.event_processing import event_accumulator

import train_testing

pytestmark = pytest.mark.slow  # Subprocesses: the tools and the launcher.

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config_file(tmp_path) -> pathlib.Path:
  return train_testing.write_config_file(tmp_path / 'micro_config.py', str(tmp_path / 'data'),
                                         steps=4)


def _run(script: str, args: list[str], extra_env=None) -> subprocess.CompletedProcess:
  result = train_testing.run_script(script, args, extra_env)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _launch(tmp_path, extra_env=None) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
  workdir = tmp_path / 'run'
  result = _run('projects/qna_detr/main.py',
                [f'--config={_config_file(tmp_path)}', f'--workdir={workdir}',
                 '--config.num_train_steps=3', '--config.checkpoint_every_steps=1000'],
                extra_env)
  return workdir, result


def _check_run(workdir: pathlib.Path, result: subprocess.CompletedProcess, launcher: str):
  # The override (3 steps, checkpoint only at the end) reached the run.
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  metrics = json.loads((workdir / 'metrics.json').read_text())
  assert list(metrics)[:12] == ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                                'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl']
  assert all(-1.0 <= v <= 1.0 for k, v in metrics.items() if k != 'note')
  assert f'Launcher: {launcher}' in result.stderr
  # A quiet console: the project's own lines (HH:MM:SS first); from other libraries only
  # TensorFlow's start-up notice (two lines, at most twice).
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  others = [line for line in lines if not re.match(r'\d\d:\d\d:\d\d ', line)]
  assert len(others) <= 4 and all('oneDNN' in x or 'absl::InitializeLog' in x for x in others)
  assert re.search(r'train 3/3  loss \d', result.stderr)


def _tensorboard(workdir: pathlib.Path) -> event_accumulator.EventAccumulator:
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={'images': 0})
  events.Reload()
  return events


def test_own_entry_point_then_evaluate(tmp_path):
  workdir, result = _launch(tmp_path, {'QNA_DETR_DISABLE_SCENIC': '1'})
  _check_run(workdir, result, 'qna_detr')
  # TensorBoard: scalars that event readers find as scalars, pictures, no -1 metrics.
  tags = _tensorboard(workdir).Tags()
  assert {'loss', 'grad_norm', 'lr_head', 'val/AP', 'val/AP50'} <= set(tags['scalars'])
  assert 'val/APl' not in tags['scalars']  # -1 from pycocotools: no large objects.
  assert [s.step for s in _tensorboard(workdir).Scalars('val/AP')] == [3]
  assert any(tag.startswith('val/pictures/') for tag in tags['images'])
  config_text = _tensorboard(workdir).Tensors('config')[0].tensor_proto.string_val[0].decode()
  assert 'num_train_steps: 3' in config_text  # The resolved config, overrides included.
  # tools/evaluate.py on the final checkpoint, with the run's own config (config.json):
  # the summary, the files (in WORKDIR/eval/<step> by default), the numbers of the run.
  trained = json.loads((workdir / 'metrics.json').read_text())
  result = _run('tools/evaluate.py', [f'--workdir={workdir}'])
  assert result.stdout.count('Average Precision') == 6
  output = workdir / 'eval' / '3'
  assert json.loads((output / 'metrics.json').read_text()) == trained
  detections = json.loads((output / 'detections.json').read_text())
  assert {d['category_id'] for d in detections} <= {1, 2, 3, 4, 5}
  assert (output / 'per_category_ap.txt').read_text().startswith('category')
  # The same config given again is accepted; another one is refused, naming the key.
  _run('tools/evaluate.py', [f'--config={_config_file(tmp_path)}', '--config.num_train_steps=3',
                             '--config.checkpoint_every_steps=1000', f'--workdir={workdir}',
                             f'--output={tmp_path / "again"}'])
  other = train_testing.run_script('tools/evaluate.py', [
      f'--config={_config_file(tmp_path)}', f'--workdir={workdir}'])
  assert other.returncode != 0
  assert re.search(r'config.checkpoint_every_steps=1000 \(now \d+\), '
                   r'config.num_train_steps=3 \(now 4\)', other.stderr), other.stderr


# The README's scripts are run with --help by tests/test_readme.py.
@pytest.mark.parametrize('script', ['tools/pretrain_backbone.py', 'tools/model_summary.py',
                                    'tools/classify.py'])
def test_help_lists_the_flags_and_exits_0(script):
  result = _run(script, ['--help'])
  assert '--workdir' in result.stdout or '--backbone' in result.stdout, result.stdout


@pytest.mark.skipif(importlib.util.find_spec('scenic') is None or
                    importlib.util.find_spec('scenic.app') is None,
                    reason='Scenic is not importable (it is not on PyPI; see the README)')
def test_scenic_entry_point(tmp_path):
  workdir, result = _launch(tmp_path)
  _check_run(workdir, result, 'scenic')
