"""Mistakes a user can fix, each in a fresh process: one last line `ERROR: ...` that names the
key, file, flag or workdir, and no traceback (that needs --verbosity)."""
import pytest

import train_testing

pytestmark = pytest.mark.slow  # Subprocesses.
MAIN = 'projects/qna_detr/main.py'


def _mistakes(tmp_path):
  config = str(train_testing.write_config_file(tmp_path / 'micro.py', str(tmp_path / 'data')))
  run = [f'--config={config}', f'--workdir={tmp_path / "run"}']
  (tmp_path / 'a_file').write_text('')
  return {
      'unknown key': (MAIN, run + ['--config.batchsize=3'], "no key 'batchsize'. Did you mean "
                      '"batch_size"'),
      'unknown detector': (MAIN, run + ['--config.model.name=yolo'],
                           "config.model.name='yolo' is not a registered detector"),
      'zero batch': (MAIN, run + ['--config.batch_size=0'], 'config.batch_size'),
      'negative rate': (MAIN, run + ['--config.optimizer.lr=-1'], 'config.optimizer.lr=-1'),
      'decay after the end': (MAIN, run + ['--config.num_train_steps=-1',
                                           '--config.num_epochs=2',
                                           '--config.optimizer.decay_epochs=(5,)'],
                              'config.optimizer.decay_epochs=(5,)'),
      'workdir is a file': (MAIN, [f'--config={config}', f'--workdir={tmp_path / "a_file"}'],
                            f'--workdir={tmp_path / "a_file"} is a file'),
      'missing annotations': (MAIN, run + [f'--config.dataset.{k}={tmp_path / "no" / k}'
                                           for k in ('train_json', 'train_images', 'val_json',
                                                     'val_images')],
                              str(tmp_path / 'no' / 'train_json')),
      'no run in workdir': ('tools/evaluate.py', [f'--workdir={tmp_path / "nowhere"}'],
                            f'No config.json in {tmp_path / "nowhere"}'),
      'export of no run': ('tools/export_model.py', [f'--workdir={tmp_path / "nowhere"}',
                                                     f'--output={tmp_path / "out"}'],
                           f'No config.json in {tmp_path / "nowhere"}'),
      'not a checkpoint file': ('tools/import_checkpoint.py', [
          f'--config={config}', f'--checkpoint={tmp_path / "a_file"}',
          f'--workdir={tmp_path / "imported"}'], f'{tmp_path / "a_file"} is not a zip archive'),
  }


@pytest.mark.parametrize('name', ['unknown key', 'unknown detector', 'zero batch',
                                  'negative rate', 'decay after the end', 'workdir is a file',
                                  'missing annotations', 'no run in workdir', 'export of no run',
                                  'not a checkpoint file'])
def test_a_mistake_is_one_named_line(tmp_path, name):
  script, args, named = _mistakes(tmp_path)[name]
  result = train_testing.run_script(script, args)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('ERROR: ') and named in last, last
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
