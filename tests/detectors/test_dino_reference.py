"""The 'dino' head against IDEA-Research/DINO's own model code: its random weights converted
from the checkpoint torch wrote, the same multi-scale features in place of a backbone, and the
same denoising noise (testdata/make_dino_fixture.py wrote the fixture)."""
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.detectors import base
from qna_detr.detectors.dino import denoising
from qna_detr.detectors.dino import losses
from qna_detr.detectors.dino import official_weights
from qna_detr.detectors.dino.model import DINO
from qna_detr.detectors.matcher import HungarianMatcher

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
LAYERS = 2


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(os.path.join(TESTDATA, 'dino_tiny.npz')))


@pytest.fixture(scope='module')
def converted():
  return official_weights.read(os.path.join(TESTDATA, 'dino_tiny.pth'), num_heads=8)


def _module() -> DINO:
  return DINO(backbone=base.GivenFeatures(), num_classes=4, feature_levels=(0, 1, 2),
              num_feature_levels=4, hidden_dim=256, num_heads=8, num_encoder_layers=2,
              num_decoder_layers=LAYERS, dim_feedforward=32, num_queries=12, dn_number=50,
              dn_label_noise=0.5, dn_box_noise=1.0)


def _inputs(reference):
  features = tuple(jnp.asarray(reference[f'input/features_{i}']) for i in range(3))
  masks = tuple(jnp.asarray(reference[f'input/mask_{i}']) for i in range(3))
  return features, masks


def _targets(reference):
  return {k: jnp.asarray(reference[f'input/{k}']) for k in ('boxes', 'labels', 'box_mask')}


def _rel(actual, expected) -> float:
  expected = np.asarray(expected, np.float64)
  return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def _layers(outputs):
  return outputs['aux_outputs'] + [{k: outputs[k] for k in ('pred_logits', 'pred_boxes')}]


def test_every_tensor_of_the_state_dict_is_mapped_once(reference, converted):
  tree, report = converted
  assert not report.unknown
  assert len(report.mapped) + len(report.aliases) == int(reference['state_dict_size']) == 145
  assert len(set(report.mapped) | set(report.aliases)) == 145
  features, masks = _inputs(reference)
  wanted = jax.eval_shape(lambda: _module().init(jax.random.PRNGKey(0), features, masks,
                                                 train=False))['params']
  flat_wanted = traverse_util.flatten_dict(wanted, sep='/')
  flat_tree = traverse_util.flatten_dict(tree, sep='/')
  assert flat_tree.keys() == flat_wanted.keys()
  for name, leaf in flat_wanted.items():
    assert flat_tree[name].shape == leaf.shape, name


def test_inference_equals_the_reference(reference, converted):
  tree, _ = converted
  features, masks = _inputs(reference)
  out = _module().apply({'params': tree}, features, masks, train=False)
  np.testing.assert_array_equal(np.sort(out['interm_outputs']['selected'], -1),
                                np.sort(reference['eval/selected'], -1))
  for i, layer in enumerate(_layers(out)):
    assert _rel(layer['pred_logits'], reference[f'eval/{i}/logits']) <= 1e-4, i
    assert _rel(layer['pred_boxes'], reference[f'eval/{i}/boxes']) <= 1e-4, i
  assert _rel(out['interm_outputs']['pred_logits'], reference['eval/interm/logits']) <= 1e-4
  assert _rel(out['interm_outputs']['pred_boxes'], reference['eval/interm/boxes']) <= 1e-4


@pytest.fixture(scope='module')
def trained(reference, converted):
  """The training forward with DINO's recorded noise, laid out in this module's slots."""
  tree, _ = converted
  features, masks = _inputs(reference)
  slots = denoising.num_slots(50, reference['input/labels'].shape[1])

  def recorded(key, batch, num_slots, num_classes):
    del key, num_classes
    assert (batch, num_slots) == (2, slots)
    pad = lambda x: np.pad(x, [(0, 0), (0, slots - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return denoising.Noise(*(jnp.asarray(pad(reference[f'noise/{k}']))
                             for k in ('flip', 'new_label', 'sign', 'amount')))

  saved, denoising.draw_noise = denoising.draw_noise, recorded
  try:
    out = _module().apply({'params': tree}, features, masks, train=True,
                          targets=_targets(reference),
                          rngs={'dropout': jax.random.PRNGKey(0),
                                'denoise': jax.random.PRNGKey(1)})
  finally:
    denoising.draw_noise = saved
  return out


def test_training_outputs_and_denoising_equal_the_reference(reference, trained):
  out = trained
  dn = out['dn']
  groups, width = int(reference['train/groups']), int(reference['train/group_width'])
  assert int(dn.groups) == groups == 16 and width == 6  # 100 // (2 x 3 boxes) groups.
  used = groups * width
  assert np.asarray(dn.exists).sum() == used
  for i, layer in enumerate(_layers(out)):
    assert _rel(layer['pred_logits'], reference[f'train/{i}/logits']) <= 1e-4, i
    assert _rel(layer['pred_boxes'], reference[f'train/{i}/boxes']) <= 1e-4, i
  for i, layer in enumerate(out['dn_outputs']):
    assert _rel(layer['pred_logits'][:, :used], reference[f'train/dn/{i}/logits']) <= 1e-4, i
    assert _rel(layer['pred_boxes'][:, :used], reference[f'train/dn/{i}/boxes']) <= 1e-4, i
  np.testing.assert_array_equal(np.sort(out['interm_outputs']['selected'], -1),
                                np.sort(reference['train/selected'], -1))
  # The attention mask, where this module's slots are DINO's queries.
  slots = dn.exists.shape[0]
  mine = np.asarray(dn.attention_blocked)
  keep = np.r_[np.arange(used), slots + np.arange(12)]
  np.testing.assert_array_equal(mine[np.ix_(keep, keep)], reference['train/attn_mask'])
  # Slots beyond DINO's are seen by no query and see only themselves.
  spare = np.arange(used, slots)
  assert mine[:, spare][~np.isin(np.arange(mine.shape[0]), spare)].all()
  assert (mine[spare].sum(1) == mine.shape[0] - 1).all()


def test_the_criterion_equals_the_references(reference, trained):
  matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, solver='scipy',
                             class_cost='focal', focal_alpha=0.25)
  total, components = losses.criterion(trained, _targets(reference), matcher)
  expected = {k[len('train/'):]: v for k, v in reference.items()
              if k.startswith('train/loss_') and k != 'train/loss_total'}
  assert components.keys() == expected.keys()
  for name, value in expected.items():
    assert float(components[name]) == pytest.approx(float(value), rel=1e-4), name
  assert float(total) == pytest.approx(float(reference['train/loss_total']), rel=1e-4)
