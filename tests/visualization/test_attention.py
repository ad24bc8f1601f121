"""QnA attention made explicit, checked against the layer itself and by hand; the geometry
and the layer selection of the pictures."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from qna_detr.layers import masking
from qna_detr.layers.qna import QnA
from qna_detr.visualization import attention
from qna_detr.visualization import capture
from qna_detr.visualization import drawing
from qna_detr.visualization import figures


def _random_params(layer, x, seed):
  """Initialised, then every leaf replaced by noise so that the zero-initialised bias counts."""
  params = layer.init(jax.random.key(seed), x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(scale=0.5, size=leaf.shape),
                                               jnp.float32), params)


@pytest.mark.parametrize('kernel,stride,queries,upsample,masked', [
    (3, 1, 2, 1, False),
    (3, 2, 2, 1, True),
    (5, 1, 3, 1, True),
    (3, 1, 1, 2, False),
])
def test_window_weights_reproduce_the_layer(kernel, stride, queries, upsample, masked):
  """Aggregating values with the weights (times Ws) gives the layer's own output."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 9, 16)).astype(np.float32)
  mask = rng.random((2, 7, 9)) < 0.3 if masked else None
  layer = QnA(16, 4, kernel, stride=stride, num_queries=queries, upsample=upsample)
  params = _random_params(layer, x, seed=1)
  p = params['params']
  weights = attention.window_weights(x, mask, p, heads=4, stride=stride)
  values = (x @ p['to_v']['kernel']).reshape(2, 7, 9, 4, 4)
  per_query = attention.aggregate(weights, values, p['attn_scale_weights'], stride)
  b, ho, wo = per_query.shape[:3]
  out = per_query.reshape(b, ho, wo, upsample, upsample, queries, 16).sum(5)
  out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, ho * upsample, wo * upsample, 16)
  want = layer.apply(params, x, mask)
  np.testing.assert_allclose(out @ p['to_out']['kernel'], want, rtol=1e-5, atol=1e-5)


def test_weights_sum_to_one_and_maps_count_windows():
  x = np.random.default_rng(2).normal(size=(1, 6, 8, 8)).astype(np.float32)
  layer = QnA(8, 2, 3)
  p = _random_params(layer, x, seed=3)['params']
  weights = attention.window_weights(x, None, p, heads=2, stride=1)
  np.testing.assert_allclose(weights.sum((3, 4)), 1.0, rtol=1e-6)
  maps = attention.attention_map(weights, 6, 8, 1)
  assert maps.shape == (1, 6, 8, 2, 2)
  np.testing.assert_allclose(maps.sum((1, 2)), 6 * 8, rtol=1e-5)


def test_padding_gets_nothing_and_padded_windows_are_left_out():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 9, 10, 8)).astype(np.float32)
  mask = np.zeros((1, 9, 10), bool)
  mask[:, 6:] = mask[:, :, 7:] = True  # A 6 x 7 image in a 9 x 10 batch.
  mask[0, 2, 3] = True  # And a hole.
  layer = QnA(8, 2, 3, stride=2)
  p = _random_params(layer, x, seed=5)['params']
  weights = attention.window_weights(x, mask, p, heads=2, stride=2)
  np.testing.assert_allclose(weights.sum((3, 4)),
                             np.broadcast_to(masking.window_any(~mask, 3, 2)[..., None, None],
                                             (1, 5, 5, 2, 2)).astype(np.float32), rtol=1e-6)
  maps = np.asarray(attention.attention_map(weights, 9, 10, 2, mask))
  assert np.all(maps[mask] == 0.0)
  centred_on_image = (~mask[:, ::2, ::2]).sum()  # 3 x 4 window centres minus the hole's.
  np.testing.assert_allclose(maps.sum((1, 2)), centred_on_image, rtol=1e-5)


def test_attention_map_by_hand():
  """A 1 x 3 map with equal scores: windows of 2, 3 and 2 pixels share their weight evenly."""
  x = np.ones((1, 1, 3, 4), np.float32)
  params = {'query': np.ones((1, 4), np.float32), 'Wk': np.zeros((4, 4), np.float32),
            'rpe_bias': np.zeros((3, 3, 1, 1), np.float32)}
  weights = attention.window_weights(x, None, params, heads=1, stride=1)
  maps = np.asarray(attention.attention_map(weights, 1, 3, 1))[0, 0, :, 0, 0]
  np.testing.assert_allclose(maps, [1 / 2 + 1 / 3, 1 / 2 + 1 / 3 + 1 / 2, 1 / 3 + 1 / 2],
                             rtol=1e-6)


def test_mosaic_puts_each_window_at_its_place():
  weights = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
  mosaic = attention.window_mosaic(weights)
  assert mosaic.shape == (6, 9)
  np.testing.assert_array_equal(mosaic[3:6, 6:9], weights[1, 2])


def test_maps_land_on_the_image_unflipped():
  """A hot cell (row 1, col 3) of a 4 x 6 stride-4 grid lands on its pixels, not transposed."""
  assert figures.cell_size((16, 24), (4, 6)) == 4
  assert figures.cell_size((64, 48), (8, 6)) == 8
  values = np.zeros((4, 6), np.float32)
  values[1, 3] = 1.0
  image = drawing.map_to_image(values, 4, (14, 24), (28, 48))
  assert image.shape == (28, 48)
  row, col = np.unravel_index(np.argmax(image), image.shape)
  assert 8 <= row < 16 and 24 <= col < 32


def test_boxes_are_drawn_where_they_are():
  image = Image.new('RGB', (60, 60))
  detections = {'boxes': np.array([[10.0, 25.0, 20.0, 20.0], [45.0, 50.0, 5.0, 5.0]]),
                'labels': np.array([0, 1]), 'scores': np.array([0.9, 0.1])}
  drawn = np.asarray(drawing.draw_detections(image, detections, ['a', 'b'], threshold=0.5))
  assert drawn.shape == (60, 60, 3)
  assert drawn[40, 10].any() and drawn[40, 30].any()  # Left and right sides (x = 10, 30).
  assert drawn[45, 20].any() and not drawn[40, 20].any()  # Bottom side (y = 45), inside.
  assert drawn[20, 12].any()  # The caption, above the box.
  assert not drawn[48:, 43:].any()  # The box under the threshold.


@pytest.fixture(scope='module')
def layers():
  from qna_detr import detectors, recipes
  model = detectors.build(recipes.toy(64), 5).module
  images, mask = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
  params = jax.eval_shape(lambda k: model.init(k, images, mask, train=False),
                          jax.random.key(0))['params']
  return capture.describe_layers(model, params)


def test_layers_are_listed_and_selected(layers):
  assert [layer.short_name for layer in layers.values()][:2] == ['stage1_qna1', 'stage1_down']
  assert layers['backbone/stage1_down/mixer'].stride == 2
  assert capture.select_layer(layers, '1').short_name == 'stage1_down'
  assert capture.select_layer(layers, 'stage2_qna2').name == 'backbone/stage2_qna2/mixer'
  assert capture.select_layer(layers, 'backbone/stage3_qna1/mixer').short_name == 'stage3_qna1'
  layer = layers['backbone/stage1_qna1/mixer']
  assert capture.select_heads(layer, ['all']) == [0, 1, 2, 3]
  assert capture.select_heads(layer, ['3', '1']) == [3, 1]


@pytest.mark.parametrize('flag,call', [
    ('--layer=stage9', lambda layers: capture.select_layer(layers, 'stage9')),
    ('--layer=stage1', lambda layers: capture.select_layer(layers, 'stage1')),
    ('--layer=7', lambda layers: capture.select_layer(layers, '7')),
    ('--head=4', lambda layers: capture.select_heads(layers['backbone/stage1_qna1/mixer'],
                                                     ['4'])),
    ('--head=x', lambda layers: capture.select_heads(layers['backbone/stage1_qna1/mixer'],
                                                     ['x'])),
    ('--query=2', lambda layers: capture.check_query(layers['backbone/stage1_qna1/mixer'], 2)),
])
def test_bad_choices_name_the_flag(layers, flag, call):
  with pytest.raises(ValueError, match=flag) as error:
    call(layers)
  if flag.startswith('--layer'):
    assert 'stage1_qna1' in str(error.value)  # The choices are listed.


def test_image_files_match_the_split(toy_config):
  """Image files given by path go through the split's evaluation transform: same inputs."""
  from qna_detr.data import image_folder
  from qna_detr.data import pipeline
  from qna_detr.visualization import inputs
  config = ml_collections.ConfigDict(toy_config.to_dict())
  build = lambda **kw: pipeline.build_dataset(config, split='val', global_batch_size=2,
                                              shuffle_seed=0, train=False, **kw)
  examples = list(inputs.from_split(build(), 2))
  files = {im['id']: im['file_name'] for im in build().coco_ground_truth()['images']}
  folder = config.dataset.val_images
  paths = [f'{folder}/{files[int(e.name)]}' for e in reversed(examples)]
  source, skipped = image_folder.image_files(paths)
  from_files = list(inputs.from_split(build(source=source), 2, {0: 'b', 1: 'a'}))
  assert not skipped and [e.name for e in from_files] == ['b', 'a']
  for example, from_file in zip(examples, reversed(from_files)):
    assert from_file.size == example.size and from_file.orig_size == example.orig_size
    height, width = example.size
    np.testing.assert_array_equal(from_file.inputs[:, :height, :width],
                                  example.inputs[:, :height, :width])
