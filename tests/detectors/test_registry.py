"""The detector seam: a variant registered from outside trains, evaluates and predicts through
the project's machinery, which imports no detector module."""
import pathlib

from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr import detectors
from qna_detr import parallel
from qna_detr.backbones import registry as backbones
from qna_detr.detectors.detr.losses import LossWeights, set_criterion
from qna_detr.detectors.matcher import HungarianMatcher
from qna_detr.detectors.detr.postprocess import postprocess
from qna_detr.train import phases
import train_testing

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAME = 'cell_detector'


class CellDetector(nn.Module):
  """One prediction per feature-map cell: class logits and a box from linear heads."""
  backbone: nn.Module
  num_classes: int
  feature_levels: tuple[int, ...] = (-1,)

  @nn.compact
  def __call__(self, images, padding_mask, *, train):
    level, = detectors.select_levels(self.backbone(images, padding_mask, train=train),
                                     self.feature_levels)
    tokens = level.features.reshape(level.features.shape[0], -1, level.features.shape[-1])
    logits = nn.Dense(self.num_classes + 1, name='classes')(tokens).astype(jnp.float32)
    boxes = jax.nn.sigmoid(nn.Dense(4, name='boxes')(tokens).astype(jnp.float32))
    return {'pred_logits': logits, 'pred_boxes': boxes}


def build_cell_detector(config, num_classes):
  matcher = HungarianMatcher(batch_axis=parallel.BATCH_AXIS)
  return detectors.DetectorDef(
      module=CellDetector(backbones.build(config.model), num_classes),
      loss=lambda outputs, batch: set_criterion(
          outputs, {k: batch[k] for k in ('boxes', 'labels', 'box_mask')}, matcher,
          LossWeights()),
      postprocess=lambda outputs, sizes, top_k: postprocess(outputs, sizes, top_k=top_k),
      num_classes=num_classes)


@pytest.fixture(scope='module')
def registered():
  if NAME not in detectors.names():
    detectors.register(NAME, build_cell_detector)
  return NAME


def test_names_are_registered_once(registered):
  assert {'detr', registered} <= set(detectors.names())
  with pytest.raises(ValueError, match='already registered'):
    detectors.register(registered, build_cell_detector)
  config = train_testing.micro_config('unused')
  config.model.name = 'yolo'
  with pytest.raises(ValueError, match=r"config\.model\.name='yolo'.*detr"):
    detectors.build(config, 5)


@pytest.mark.slow  # End to end.
def test_a_registered_variant_trains_and_evaluates(registered, tmp_path):
  config = train_testing.micro_config(str(tmp_path / 'data'), steps=3)
  config.model.name = registered
  config.eval_top_k = 8  # Of the 16 cells of a 64 x 64 image at stride 16.
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
