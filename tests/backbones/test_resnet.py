"""ResNet-50 with frozen batch norm, and torchvision weights read without torch.

References: torchvision's published ResNet-50 parameter count, a direct numpy implementation
of the stem and bottleneck blocks, the unfolded batch-norm formula, and values written by
torch (testdata/make_torchvision_fixture.py).
"""
import os
import pickle
import zipfile

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.backbones import torchvision_weights
from qna_detr.utils import torch_pickle
from qna_detr.backbones.resnet import FrozenBatchNorm, ResNet, ResNetClassifier
from qna_detr.backbones.resnet import fold_batch_norm, frozen_param

TORCHVISION_RESNET50_PARAMS = 25_557_032  # torchvision.models.resnet50, 1000 classes.
TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
BN_STATS = ('weight', 'bias', 'running_mean', 'running_var')


def _abstract_params(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))['params']


def _random_params(model, shape, seed=0):
  """Parameters with random values everywhere: kernels at He scale, batch-norm affines away
  from the identity."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == 'kernel':
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(scale=np.sqrt(2 / fan_in), size=leaf.shape).astype(np.float32)
    if path[-1].key == 'scale':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(scale=0.1, size=leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, _abstract_params(model, shape))


def test_parameter_count_matches_torchvision():
  params = _abstract_params(ResNetClassifier(1000), (1, 224, 224, 3))
  assert sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)) == (
      TORCHVISION_RESNET50_PARAMS)
  assert sorted(params) == ['backbone', 'head']
  assert params['head']['kernel'].shape == (2048, 1000)


def test_pyramid_for_odd_non_square_input():
  images = jnp.zeros((2, 37, 70, 3))
  pyramid, variables = jax.eval_shape(ResNet().init_with_output, jax.random.key(0), images,
                                      jnp.zeros((2, 37, 70), bool))
  want = [(-(-37 // s), -(-70 // s)) for s in (4, 8, 16, 32)]
  assert [f.features.shape[1:3] for f in pyramid] == want
  assert [f.mask.shape[1:] for f in pyramid] == want
  assert [f.features.shape[-1] for f in pyramid] == [256, 512, 1024, 2048]
  assert list(variables) == ['params']  # Frozen batch norm keeps no batch statistics.


def test_masks_cover_the_padding_of_each_image():
  model = ResNet(depths=(1, 1, 1, 1))
  images = np.zeros((2, 45, 70, 3), np.float32)
  mask = np.ones((2, 45, 70), bool)
  sizes = [(45, 33), (17, 70)]
  for n, (hgt, wid) in enumerate(sizes):
    mask[n, :hgt, :wid] = False
  pyramid = model.apply({'params': _random_params(model, images.shape)}, images, mask)
  for stride, level in zip((4, 8, 16, 32), pyramid):
    for n, (hgt, wid) in enumerate(sizes):
      rows, cols = np.indices(level.mask.shape[1:])
      want = (rows >= -(-hgt // stride)) | (cols >= -(-wid // stride))
      np.testing.assert_array_equal(level.mask[n], want)


def test_frozen_batch_norm_equals_batch_norm_in_eval_mode():
  rng = np.random.default_rng(0)
  gamma, beta, mean = rng.normal(size=(3, 8))
  var = rng.uniform(0.1, 3.0, 8)
  x = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
  scale, bias = fold_batch_norm(gamma, beta, mean, var)
  params = {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}
  got = FrozenBatchNorm().apply({'params': params}, x)
  np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5) * gamma + beta,
                             rtol=1e-5, atol=1e-5)


def _np_conv(x: np.ndarray, kernel: np.ndarray, stride: int, pad: int) -> np.ndarray:
  """Cross-correlation of [B, H, W, I] with [kh, kw, I, O], zero padding on every side."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = kernel.shape[:2]
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for dy in range(kh):
    for dx in range(kw):
      rows = slice(dy, dy + stride * (out_h - 1) + 1, stride)
      cols = slice(dx, dx + stride * (out_w - 1) + 1, stride)
      out += x[:, rows, cols] @ kernel[dy, dx]
  return out


def _np_max_pool(x: np.ndarray) -> np.ndarray:
  """3x3 stride-2 max pool, the border padded by 1 with -inf."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return np.max([x[:, dy:dy + 2 * out_h - 1:2, dx:dx + 2 * out_w - 1:2]
                 for dy in range(3) for dx in range(3)], axis=0)


def _np_resnet(params, x: np.ndarray, depths) -> list[np.ndarray]:
  """The stage outputs of torchvision's ResNet v1.5 with folded batch norm."""
  relu = lambda y: np.maximum(y, 0)
  bn = lambda p, y: y * np.asarray(p['scale']) + np.asarray(p['bias'])
  conv = lambda p, y, stride, pad: _np_conv(y, np.asarray(p['kernel']), stride, pad)
  y = _np_max_pool(relu(bn(params['bn1'], conv(params['conv1'], x, 2, 3))))
  outputs = []
  for stage, depth in enumerate(depths):
    for block in range(depth):
      p = params[f'layer{stage + 1}_{block}']
      stride = 2 if block == 0 and stage > 0 else 1
      h = relu(bn(p['bn1'], conv(p['conv1'], y, 1, 0)))
      h = relu(bn(p['bn2'], conv(p['conv2'], h, stride, 1)))
      h = bn(p['bn3'], conv(p['conv3'], h, 1, 0))
      if block == 0:
        y = bn(p['downsample_bn'], conv(p['downsample_conv'], y, stride, 0))
      y = relu(h + y)
    outputs.append(y)
  return outputs


def test_stem_and_bottlenecks_match_numpy():
  """Odd and even sizes, so that torchvision's symmetric padding is exercised at every stride."""
  depths = (1, 2)
  model = ResNet(depths=depths)
  x = np.random.default_rng(1).normal(size=(1, 29, 40, 3)).astype(np.float32)
  params = _random_params(model, x.shape)
  got = model.apply({'params': params}, x)
  for level, want in zip(got, _np_resnet(params, x, depths), strict=True):
    assert level.features.shape == want.shape
    np.testing.assert_allclose(level.features, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_bfloat16_compute_keeps_float32_params():
  model = ResNet(depths=(1, 1), dtype=jnp.bfloat16)
  x = np.random.default_rng(2).normal(size=(1, 32, 48, 3)).astype(np.float32)
  params = _random_params(model, x.shape)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  low = model.apply({'params': params}, x)[-1].features
  high = ResNet(depths=(1, 1)).apply({'params': params}, x)[-1].features
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), high, atol=0.05 * np.abs(high).max())


def test_train_flag_changes_nothing():
  model = ResNet(depths=(1, 1))
  x = np.random.default_rng(3).normal(size=(2, 32, 48, 3)).astype(np.float32)
  variables = {'params': _random_params(model, x.shape)}
  for a, b in zip(model.apply(variables, x, train=True), model.apply(variables, x)):
    np.testing.assert_array_equal(a.features, b.features)


def test_classifier_pools_real_pixels_only():
  depths = (1, 1)
  model = ResNetClassifier(num_classes=5, depths=depths)
  images = np.random.default_rng(4).normal(size=(1, 64, 96, 3)).astype(np.float32)
  mask = np.ones((1, 64, 96), bool)
  mask[:, :33, :40] = False
  images[mask] = 0.0
  params = _random_params(model, images.shape)
  last = ResNet(depths=depths).apply({'params': params['backbone']}, images, mask)[-1]
  real = np.asarray(last.features)[0][~np.asarray(last.mask)[0]]
  assert real.shape == (5 * 5, 512)  # ceil(33 / 8) x ceil(40 / 8) real positions.
  want = real.mean(0) @ params['head']['kernel'] + params['head']['bias']
  np.testing.assert_allclose(model.apply({'params': params}, images, mask)[0], want,
                             rtol=1e-5, atol=1e-5)


def test_frozen_params_are_the_batch_norms_stem_and_layer1():
  flat = traverse_util.flatten_dict(_abstract_params(ResNet()))
  frozen = {path for path in flat if frozen_param(path)}
  norms = {path for path in flat if path[-2].startswith(('bn', 'downsample_bn'))}
  early = {path for path in flat if path[0] in ('conv1', 'bn1') or path[0].startswith('layer1_')}
  assert len(norms) == 2 * 53  # One per conv: the stem, 3 per block, 4 shortcuts.
  assert frozen == norms | early
  trainable = set(flat) - frozen
  assert all(p[-1] == 'kernel' and p[0][:6] in ('layer2', 'layer3', 'layer4') for p in trainable)
  assert len(trainable) == 3 * (4 + 6 + 3) + 3  # Three convs per block, three shortcuts.
  # torchvision's count less the head (2048 x 1000 + 1000), every batch norm (2 x 26,560),
  # the stem conv (7 x 7 x 3 x 64) and layer1's convs (212,992).
  assert sum(np.prod(flat[p].shape) for p in trainable) == (
      TORCHVISION_RESNET50_PARAMS - 2_049_000 - 53_120 - 9_408 - 212_992)


# torchvision's converter inputs.

def _torchvision_resnet50_shapes() -> dict[str, tuple[int, ...]]:
  """Names and shapes of torchvision's resnet50().state_dict()."""
  shapes = {'conv1.weight': (64, 3, 7, 7)}

  def norm(name, channels):
    shapes.update({f'{name}.{stat}': (channels,) for stat in BN_STATS})
    shapes[f'{name}.num_batches_tracked'] = ()
  norm('bn1', 64)
  inplanes = 64
  for stage, (depth, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    for block in range(depth):
      prefix = f'layer{stage + 1}.{block}'
      shapes[f'{prefix}.conv1.weight'] = (width, inplanes, 1, 1)
      shapes[f'{prefix}.conv2.weight'] = (width, width, 3, 3)
      shapes[f'{prefix}.conv3.weight'] = (4 * width, width, 1, 1)
      for k, channels in enumerate((width, width, 4 * width)):
        norm(f'{prefix}.bn{k + 1}', channels)
      if block == 0:
        shapes[f'{prefix}.downsample.0.weight'] = (4 * width, inplanes, 1, 1)
        norm(f'{prefix}.downsample.1', 4 * width)
      inplanes = 4 * width
  shapes.update({'fc.weight': (1000, 2048), 'fc.bias': (1000,)})
  return shapes


def _random_state_dict(seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in _torchvision_resnet50_shapes().items():
    if name.endswith('num_batches_tracked'):
      state[name] = np.asarray(100, np.int64)
    elif name.endswith('running_var'):
      state[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      state[name] = rng.normal(size=shape).astype(np.float32)
  return state


def test_torchvision_names_cover_the_classifier():
  shapes = _torchvision_resnet50_shapes()
  assert len(shapes) == 320
  assert sum(np.prod(s) for n, s in shapes.items()
             if not n.endswith(('running_mean', 'running_var', 'num_batches_tracked'))) == (
                 TORCHVISION_RESNET50_PARAMS)
  state = _random_state_dict()
  merged, left_out = torchvision_weights.to_project(state)
  assert left_out == []
  target = _abstract_params(ResNetClassifier(1000), (1, 32, 32, 3))
  assert jax.tree.map(np.shape, merged) == jax.tree.map(lambda s: s.shape, target)
  np.testing.assert_array_equal(merged['backbone']['layer3_2']['conv2']['kernel'][1, 2],
                                state['layer3.2.conv2.weight'][:, :, 1, 2].T)
  np.testing.assert_array_equal(merged['head']['kernel'], state['fc.weight'].T)
  bn = [state[f'layer4.0.downsample.1.{k}'] for k in BN_STATS]
  scale = bn[0] / np.sqrt(bn[3] + 1e-5)
  np.testing.assert_allclose(merged['backbone']['layer4_0']['downsample_bn']['scale'], scale,
                             rtol=1e-6)
  np.testing.assert_allclose(merged['backbone']['layer4_0']['downsample_bn']['bias'],
                             bn[1] - bn[2] * scale, rtol=1e-5, atol=1e-6)


def test_incomplete_batch_norm_is_left_out():
  state = {'bn1.weight': np.ones(4, np.float32), 'bn1.bias': np.zeros(4, np.float32),
           'layer1.0.conv1.weight': np.ones((2, 4, 1, 1), np.float32)}
  tree, left_out = torchvision_weights.to_project(state)
  assert left_out == ['bn1.bias', 'bn1.weight']
  assert traverse_util.flatten_dict(tree, sep='/').keys() == {'backbone/layer1_0/conv1/kernel'}


# A state dict written by torch.save (testdata/make_torchvision_fixture.py).

@pytest.fixture(scope='module')
def torch_written():
  reference = dict(np.load(os.path.join(TESTDATA, 'torchvision_tiny.npz')))
  state = torch_pickle.read_state_dict(os.path.join(TESTDATA, 'torchvision_tiny.pth'))
  return state, reference


def test_reads_tensors_as_torch_wrote_them(torch_written):
  state, reference = torch_written
  assert sorted(state) == sorted(k for k in reference if ':' not in k)
  for name, value in state.items():
    assert value.dtype == reference[name].dtype, name
    np.testing.assert_array_equal(value, reference[name], err_msg=name)
  assert state['bn1.num_batches_tracked'].dtype == np.int64
  assert state['layer2.0.downsample.0.weight'].shape == (6, 4, 1, 1)


def test_converted_weights_compute_what_torch_computed(torch_written):
  _, reference = torch_written
  tree, left_out = torchvision_weights.read(os.path.join(TESTDATA, 'torchvision_tiny.pth'))
  assert left_out == ['layer9.extra']
  backbone = tree['backbone']
  np.testing.assert_allclose(
      reference['bn1:input'] * backbone['bn1']['scale'] + backbone['bn1']['bias'],
      reference['bn1:output'], rtol=1e-5, atol=1e-5)
  conv = jax.lax.conv_general_dilated(
      reference['conv1:input'], backbone['conv1']['kernel'], (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(conv, reference['conv1:output'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      reference['fc:input'] @ tree['head']['kernel'] + tree['head']['bias'],
      reference['fc:output'], rtol=1e-5, atol=1e-5)
  shortcut = backbone['layer2_0']
  np.testing.assert_array_equal(shortcut['downsample_conv']['kernel'][0, 0],
                                reference['layer2.0.downsample.0.weight'][:, :, 0, 0].T)
  assert set(shortcut['downsample_bn']) == {'scale', 'bias'}


class _Evil:
  """Unpickles to a call of os.system, as a malicious .pth would."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def test_runs_nothing_a_pickle_names_and_refuses_what_is_not_tensors(tmp_path):
  path = str(tmp_path / 'evil.pth')
  marker = tmp_path / 'ran'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('evil/data.pkl', pickle.dumps({'x': _Evil(str(marker))}))
  loaded = torch_pickle.load(path)
  assert isinstance(loaded['x'], torch_pickle.Opaque) and loaded['x'].name.endswith('system')
  assert not marker.exists()  # os.system was not called.
  with pytest.raises(ValueError, match='not a state dict'):
    torch_pickle.read_state_dict(path)
