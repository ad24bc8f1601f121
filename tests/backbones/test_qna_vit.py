"""QnA-ViT: the released parameter counts, its pyramid, and padded batches."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.backbones import registry
from qna_detr.backbones.qna_vit import QnAViT, QnAViTClassifier, QnAViTSpec
from qna_detr.layers.qna import QnA

# The authors' released QnA-ViT checkpoints at 224 x 224 with a 1000-class head.
RELEASED_PARAMS = {'qna_vit_tiny': 15.716e6, 'qna_vit_small': 24.972e6, 'qna_vit_base': 55.670e6}

# A small spec with every block kind, so compiled tests stay fast.
SMALL = QnAViTSpec(dims=(16, 32, 64, 128), qna_blocks=(1, 1, 1, 0), qna_heads=(2, 4, 8, 16),
                   sa_blocks=(0, 0, 1, 1), sa_windows=(7, 7, 3, 2), sa_heads=(2, 4, 8, 16),
                   drop_path=0.1)


@pytest.mark.parametrize('name', sorted(RELEASED_PARAMS))
def test_parameter_counts_match_release(name):
  """Within the paper's rounding (the authors' README gives three decimals of millions)."""
  model = registry.build_classifier({'backbone': name}, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  count = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
  assert abs(count / RELEASED_PARAMS[name] - 1) <= 1e-3


def test_tiny_7x7_has_the_released_checkpoints_exact_count():
  """The released checkpoint's 15,753,960 parameters, with its 1000-class head at 224 x 224."""
  model = registry.build_classifier({'backbone': 'qna_vit_tiny_7x7'}, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == 15_753_960
  kernels = {leaf.shape[:2] for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
             if 'rpe_bias' in jax.tree_util.keystr(path) and 'mixer' in jax.tree_util.keystr(path)
             and leaf.ndim == 4}
  assert kernels == {(7, 7)}  # Every QnA layer, the downsampling ones too.


def test_pyramid_strides_for_odd_non_square_input():
  images = jnp.zeros((1, 37, 70, 3))
  pyramid = jax.eval_shape(lambda: registry.build({'backbone': 'qna_vit_tiny'}).init_with_output(
      jax.random.key(0), images)[0])
  want = [(-(-37 // s), -(-70 // s)) for s in (4, 8, 16, 32)]
  assert [f.features.shape[1:3] for f in pyramid] == want
  assert [f.mask.shape[1:] for f in pyramid] == want
  assert [f.features.shape[-1] for f in pyramid] == [64, 128, 256, 512]


def _perturbed_params(model, images, seed=0):
  params = jax.jit(model.init)(jax.random.key(seed), images)  # Eager, QnA-ViT takes long.
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      leaf + jnp.asarray(rng.normal(scale=0.05, size=leaf.shape), jnp.float32) for leaf in leaves])


def test_padded_batch_matches_images_alone():
  """A landscape and a portrait image padded into one square batch, as detection batches do."""
  rng = np.random.default_rng(1)
  wide = rng.normal(size=(1, 45, 70, 3)).astype(np.float32)
  tall = rng.normal(size=(1, 70, 45, 3)).astype(np.float32)
  batch = np.zeros((2, 70, 70, 3), np.float32)
  mask = np.ones((2, 70, 70), bool)
  batch[0, :45, :70], mask[0, :45, :70] = wide[0], False
  batch[1, :70, :45], mask[1, :70, :45] = tall[0], False
  model = QnAViT(SMALL)
  params = _perturbed_params(model, batch)
  apply = jax.jit(model.apply)
  together = apply(params, batch, mask)
  for n, image in enumerate((wide, tall)):
    for alone, joint in zip(apply(params, image), together):
      hgt, wid = alone.features.shape[1:3]
      extent = np.zeros(joint.mask.shape[1:], bool)
      extent[:hgt, :wid] = True
      np.testing.assert_array_equal(~joint.mask[n], extent)
      scale = np.abs(alone.features).max()
      np.testing.assert_allclose(joint.features[n, :hgt, :wid], alone.features[0],
                                 atol=1e-5 * scale)
      assert np.all(np.asarray(joint.features[n])[np.asarray(joint.mask[n])] == 0)


def test_classifier_pools_real_pixels_only():
  rng = np.random.default_rng(2)
  image = rng.normal(size=(1, 33, 40, 3)).astype(np.float32)
  padded = np.zeros((1, 64, 64, 3), np.float32)
  padded[:, :33, :40] = image
  mask = np.ones((1, 64, 64), bool)
  mask[:, :33, :40] = False
  model = QnAViTClassifier(SMALL, num_classes=5)
  params = _perturbed_params(model, padded)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(params, padded, mask), apply(params, image),
                             rtol=1e-4, atol=1e-5)


def test_drop_path_rates_rise_linearly_over_all_blocks():
  spec = QnAViTSpec(dims=(8, 16), qna_blocks=(1, 1), qna_heads=(2, 4), sa_blocks=(1, 0),
                    sa_windows=(2, 2), sa_heads=(2, 2), drop_path=0.3)
  # Blocks: stage1 sa1, stage1 qna1, stage1 down, stage2 qna1 -> four rates from 0 to 0.3.
  np.testing.assert_allclose(spec.drop_path_rates(), [0.0, 0.1, 0.2, 0.3])


def test_unknown_backbone_is_named():
  with pytest.raises(ValueError, match='qna_vit_huge'):
    registry.build({'backbone': 'qna_vit_huge'})


@pytest.mark.parametrize('implementation', ['slices', 'conv'])
def test_qna_implementation_reaches_every_qna_layer(implementation):
  """Every QnA layer runs the implementation asked for, under the same parameter names."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, QnA) and context.method_name == '__call__':
      seen.append(context.module.implementation)
    return next_fun(*args, **kwargs)

  images = jnp.zeros((1, 32, 32, 3))

  def init_shapes(model):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), images))

  with nn.intercept_methods(record):
    shapes = init_shapes(QnAViTClassifier(SMALL, 5, qna_implementation=implementation))
  assert seen == [implementation] * (sum(SMALL.qna_blocks) + len(SMALL.dims) - 1)
  assert shapes == init_shapes(QnAViTClassifier(SMALL, 5))


def test_unknown_qna_implementation_is_named():
  with pytest.raises(ValueError, match='cudnn'):
    QnAViT(SMALL, qna_implementation='cudnn').init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
