"""The detector seam: a detector registered from a module outside the project (named by
config.imports) with a config key of its own trains, evaluates and predicts through the
project's machinery, which imports no detector module."""
import pathlib
import sys

from clu import metric_writers
import jax
import numpy as np
import pytest

from qna_detr import detectors
from qna_detr.train import config_checks
from qna_detr.train import phases
import train_testing

ROOT = pathlib.Path(__file__).resolve().parents[2]
PLUGIN = 'cell_detector_plugin'  # tests/detectors/cell_detector_plugin.py, outside qna_detr.
sys.path.insert(0, str(ROOT / 'tests' / 'detectors'))


def _cell_config(data_dir, **kwargs):
  """The micro config naming the plugin's detector and its own key."""
  config = train_testing.micro_config(data_dir, **kwargs)
  config.imports = (PLUGIN,)
  config.model.name = 'cell_detector'
  config.model.cell_box_scale = 1.0
  config.eval_top_k = 8  # Of the 16 cells of a 64 x 64 image at stride 16.
  return config


@pytest.fixture(scope='module')
def registered():
  config = _cell_config('unused')
  detectors.check(config)  # Imports the plugin, which registers itself.
  return 'cell_detector'


def test_names_are_registered_once(registered):
  assert {'detr', 'dino', registered} <= set(detectors.names())
  with pytest.raises(ValueError, match='already registered'):
    detectors.register(registered, lambda config, num_classes: None)
  config = train_testing.micro_config('unused')
  config.model.name = 'yolo'
  with pytest.raises(ValueError, match=r"config\.model\.name='yolo'.*detr"):
    detectors.build(config, 5)


def test_the_plugins_own_key_is_checked_by_the_plugin(registered):
  config = _cell_config('unused')
  config.model.cell_box_scale = -1.0
  with pytest.raises(ValueError, match='config.model.cell_box_scale=-1.0'):
    config_checks.check_config(config)
  config.imports = ('no_such_plugin',)
  with pytest.raises(ImportError, match="config.imports: cannot import 'no_such_plugin'"):
    config_checks.check_config(config)


@pytest.mark.slow  # End to end.
def test_a_registered_variant_trains_and_evaluates(registered, tmp_path):
  config = _cell_config(str(tmp_path / 'data'), steps=3)
  metrics = phases.run(jax.random.PRNGKey(0), config, str(tmp_path / 'run'),
                       metric_writers.LoggingWriter())
  assert set(metrics) >= {'AP', 'AP50', 'AR100'}
  assert (tmp_path / 'run' / 'checkpoints' / '3').is_dir()
  stored = detectors.build(config, 5).init(jax.random.PRNGKey(0), (64, 64))
  assert set(stored) == {'backbone', 'classes', 'boxes'}  # Its own head, not DETR's.
  # And the frozen backbone's feature cache, through the same seam.
  config.optimizer.freeze_backbone = True
  config.train_input = 'cached_features'
  config.pretrained.path = str(tmp_path / 'run' / 'checkpoints' / '3')  # The trained one.
  metrics = phases.run(jax.random.PRNGKey(0), config, str(tmp_path / 'cached'),
                       metric_writers.LoggingWriter())
  assert np.isfinite(list(metrics.values())).all()
  # A tool in a fresh process imports the plugin from the run's config.json alone.
  result = train_testing.run_script(
      'tools/evaluate.py', [f'--workdir={tmp_path / "run"}', f'--output={tmp_path / "e"}'],
      extra_env={'PYTHONPATH': f'{ROOT}:{ROOT / "tests" / "detectors"}'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Average Precision' in result.stdout
