"""Pretrained weights: the authors' parameter names mapped onto ours, our own checkpoints,
and which formats a backbone reads."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax import traverse_util
import pytest

from qna_detr.backbones import weights
from qna_detr.backbones.qna_vit import QnAViT, QnAViTSpec
from qna_detr.utils import checkpoint_io

SPEC = QnAViTSpec(dims=(8, 16, 32, 64), qna_blocks=(1, 1, 1, 0), qna_heads=(2, 4, 8, 16),
                  sa_blocks=(0, 0, 1, 1), sa_windows=(7, 7, 2, 2), sa_heads=(1, 2, 4, 8),
                  drop_path=0.0)


def _authors_tree(rng):
  """The release's names for SPEC, written out by hand from its module structure."""
  def qna(din, d, heads, k=3, queries=2):
    return {'query': rng.normal(size=(queries, d)), 'Wk': rng.normal(size=(din, d)),
            'attn_scale_weights': rng.normal(size=(1, 1, k * k, queries * heads)),
            'rpe_bias': rng.normal(size=(k * k, queries * heads)),
            'to_v': {'kernel': rng.normal(size=(din, d))},
            'to_out': {'kernel': rng.normal(size=(d, d))}}

  def block(d, mixer_name, mixer, d_in=None, skip=False):
    d_in = d_in or d
    tree = {'LayerNorm_0': {'scale': rng.normal(size=d_in), 'bias': rng.normal(size=d_in)},
            mixer_name: mixer,
            'LayerNorm_1': {'scale': rng.normal(size=d), 'bias': rng.normal(size=d)},
            'MlpBlock_0': {'Dense_0': {'kernel': rng.normal(size=(d, 4 * d)),
                                       'bias': rng.normal(size=4 * d)},
                           'Dense_1': {'kernel': rng.normal(size=(4 * d, d)),
                                       'bias': rng.normal(size=d)}}}
    if skip:
      tree['Conv_0'] = {'kernel': rng.normal(size=(1, 1, d_in, d))}
    return tree

  def msa(d, heads, window):
    return {'to_qkv': {'kernel': rng.normal(size=(d, 3 * d))},
            'to_out': {'kernel': rng.normal(size=(d, d))},
            'RelativePositionalEmbedding_0': {
                'rpe_bias': rng.normal(size=((2 * window - 1) ** 2, heads))}}

  tree = {
      'StemBlock_0': {'conv_1x1': {'kernel': rng.normal(size=(4, 4, 3, 8))}},
      'QnAStage_0': {'QnA_Block_1': block(8, 'FusedKQnA_0', qna(8, 8, 2)),
                     'QnA_Block_2_stride_2': block(16, 'FusedKQnA_0', qna(8, 16, 4), 8, True)},
      'QnAStage_1': {'QnA_Block_1': block(16, 'FusedKQnA_0', qna(16, 16, 4)),
                     'QnA_Block_2_stride_2': block(32, 'FusedKQnA_0', qna(16, 32, 8), 16, True)},
      'LSAStage_2': {'MSA_Block_1': block(32, 'MultiHeadSelfAttention_0', msa(32, 4, 2))},
      'QnAStage_2': {'QnA_Block_1': block(32, 'FusedKQnA_0', qna(32, 32, 8)),
                     'QnA_Block_2_stride_2': block(64, 'FusedKQnA_0', qna(32, 64, 16), 32, True)},
      'LSAStage_3': {'MSA_Block_1': block(64, 'MultiHeadSelfAttention_0', msa(64, 8, 2))},
      'ClassificationHead_0': {'LayerNorm_0': {'scale': rng.normal(size=64)},
                               'head_logits': {'kernel': rng.normal(size=(64, 10))}},
  }
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _save(directory, step, tree):
  checkpoints = checkpoint_io.CheckpointDir(str(directory), create=True)
  checkpoints.save(step, tree)
  checkpoints.close()


def _backbone_params():
  return QnAViT(SPEC).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']


def test_authors_checkpoint_fills_every_backbone_parameter(tmp_path):
  authors = _authors_tree(np.random.default_rng(0))
  path = tmp_path / 'checkpoint_300'
  path.write_bytes(serialization.msgpack_serialize({'params': authors, 'step': 300}))
  detector = {'backbone': _backbone_params(), 'class_embed': {'kernel': np.zeros((4, 3))}}
  loaded, report = weights.load_backbone(detector, str(path))
  assert report.missing == [] and report.unexpected == []
  assert len(report.matched) == len(jax.tree.leaves(detector['backbone']))
  ours = loaded['backbone']
  np.testing.assert_array_equal(ours['stem']['kernel'],
                                authors['StemBlock_0']['conv_1x1']['kernel'])
  theirs = authors['QnAStage_1']['QnA_Block_2_stride_2']
  down = ours['stage2_down']
  np.testing.assert_array_equal(down['skip']['kernel'], theirs['Conv_0']['kernel'])
  np.testing.assert_array_equal(down['norm1']['scale'], theirs['LayerNorm_0']['scale'])
  np.testing.assert_array_equal(down['mlp']['fc2']['bias'], theirs['MlpBlock_0']['Dense_1']['bias'])
  # [1, 1, k*k, L*h] -> [k, k, L, h]: window offset (i, j) = i*k + j, query-head l*h + head.
  k, heads = 3, 8
  for i, j, q, h in [(0, 2, 1, 5), (2, 1, 0, 7)]:
    assert down['mixer']['attn_scale_weights'][i, j, q, h] == \
        theirs['FusedKQnA_0']['attn_scale_weights'][0, 0, i * k + j, q * heads + h]
    assert down['mixer']['rpe_bias'][i, j, q, h] == \
        theirs['FusedKQnA_0']['rpe_bias'][i * k + j, q * heads + h]
  sa = authors['LSAStage_3']['MSA_Block_1']['MultiHeadSelfAttention_0']
  np.testing.assert_array_equal(ours['stage4_sa1']['mixer']['rpe_bias'],
                                sa['RelativePositionalEmbedding_0']['rpe_bias'])
  assert loaded['class_embed'] is detector['class_embed']


def test_own_checkpoint_and_a_report_of_gaps(tmp_path):
  backbone = jax.tree.map(lambda x: x + 1.0, _backbone_params())
  flat = traverse_util.flatten_dict(backbone, sep='/')
  del flat['stem/kernel']
  flat['extra/kernel'] = np.ones(3)
  partial = traverse_util.unflatten_dict(flat, sep='/')
  _save(tmp_path / 'checkpoints', 7, {'params': {'backbone': partial}})
  fresh = {'backbone': _backbone_params()}
  loaded, report = weights.load_backbone(fresh, str(tmp_path / 'checkpoints' / '7'))
  assert report.missing == ['stem/kernel'] and report.unexpected == ['extra/kernel']
  np.testing.assert_array_equal(loaded['backbone']['stem']['kernel'],
                                fresh['backbone']['stem']['kernel'])
  np.testing.assert_allclose(loaded['backbone']['stage1_qna1']['mixer']['Wk'],
                             backbone['stage1_qna1']['mixer']['Wk'])


def test_wrong_variant_and_missing_file_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.pretrained.path'):
    weights.load_backbone({'backbone': {}}, str(tmp_path / 'nope'))
  wide = QnAViT(QnAViTSpec(**{**SPEC.__dict__, 'dims': (16, 32, 64, 128)})).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  with pytest.raises(ValueError, match='stem/kernel'):
    weights.merge_into(_backbone_params(), wide)


def test_training_checkpoint_gives_its_moving_average(tmp_path):
  """A training run's checkpoint with a moving average: the average is what loads."""
  params = _backbone_params()
  average = jax.tree.map(lambda x: x + 2.0, params)
  _save(tmp_path / 'checkpoints', 3, {'params': {'backbone': params},
                                       'ema_params': {'backbone': average}})
  loaded, report = weights.load_backbone({'backbone': _backbone_params()},
                                            str(tmp_path / 'checkpoints' / '3'))
  assert not report.missing and not report.unexpected
  np.testing.assert_allclose(loaded['backbone']['stage1_qna1']['mixer']['Wk'],
                             average['stage1_qna1']['mixer']['Wk'])


def test_authors_directory_and_classifier_head(tmp_path):
  """Their README passes the model's directory: its newest checkpoint_<N> loads, head too."""
  old, new = _authors_tree(np.random.default_rng(1)), _authors_tree(np.random.default_rng(2))
  for step, tree in ((100, old), (300, new)):
    (tmp_path / f'checkpoint_{step}').write_bytes(
        serialization.msgpack_serialize({'params': tree, 'step': step}))
  classifier = {'backbone': _backbone_params(), 'norm': {'scale': np.zeros(64)},
                'head': {'kernel': np.zeros((64, 10))}}
  loaded, report = weights.load_classifier(classifier, str(tmp_path))
  assert not report.missing and not report.unexpected
  np.testing.assert_array_equal(loaded['head']['kernel'],
                                new['ClassificationHead_0']['head_logits']['kernel'])
  np.testing.assert_array_equal(loaded['norm']['scale'],
                                new['ClassificationHead_0']['LayerNorm_0']['scale'])
  np.testing.assert_array_equal(loaded['backbone']['stem']['kernel'],
                                new['StemBlock_0']['conv_1x1']['kernel'])


def test_a_format_the_backbone_does_not_read_is_named(tmp_path):
  path = tmp_path / 'checkpoint_1'
  path.write_bytes(serialization.msgpack_serialize({'params': _authors_tree(
      np.random.default_rng(0))}))
  with pytest.raises(ValueError, match=r"'authors' checkpoint; the backbone 'resnet50' reads"):
    weights.read(str(path), backbone='resnet50')
  with pytest.raises(ValueError, match='config.pretrained.format'):
    weights.read(str(path), fmt='caffe')
