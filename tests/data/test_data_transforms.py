"""Box and image transforms against hand-computed values."""

import numpy as np
import pytest
import tensorflow as tf

from qna_detr.data import transforms

DETR_TRAIN = transforms.Augmentation(
    scales=tuple(range(480, 801, 32)), max_size=1333, flip=True,
    crop_resize_scales=(400, 500, 600), crop_min_size=384, crop_max_size=600)


@pytest.mark.parametrize('hw, scale, max_size, expected', [
    ((480, 640), 800, 1333, (800, 1066)),   # 800 * 640 / 480 = 1066.67, floored.
    ((427, 640), 800, 1333, (800, 1199)),   # 1199.06
    ((640, 480), 800, 1333, (1066, 800)),   # Portrait.
    ((100, 400), 800, 1333, (333, 1332)),   # Capped: round(1333 * 100 / 400) = 333.
    ((500, 500), 800, None, (800, 800)),
    ((800, 1000), 800, 1333, (800, 1000)),  # Shorter side already at the scale.
    ((1, 2), 3, 5, (2, 4)),                 # round(5 / 2) = 2: Python's half-to-even.
])
def test_resized_shape_matches_detr(hw, scale, max_size, expected):
  h, w = transforms.resized_shape(hw[0], hw[1], scale, max_size)
  assert (int(h), int(w)) == expected


def test_resized_shape_is_elementwise():
  h, w = transforms.resized_shape([480, 640], [640, 480], 800, 1333)
  np.testing.assert_array_equal(h, [800, 1066])
  np.testing.assert_array_equal(w, [1066, 800])


def test_resize_scales_boxes_by_each_axis():
  image = tf.fill([100, 200, 3], 7.0)
  out, boxes = transforms.resize(image, tf.constant([[10., 20., 30., 40.]]), [50, 50])
  assert out.shape == (50, 50, 3)
  np.testing.assert_allclose(out, 7.0, atol=1e-5)
  np.testing.assert_allclose(boxes, [[2.5, 10., 7.5, 20.]])  # x * 50/200, y * 50/100.


def test_hflip_mirrors_image_and_boxes():
  image = tf.reshape(tf.range(2 * 100 * 3), [2, 100, 3])
  out, boxes = transforms.hflip(image, tf.constant([[10., 20., 30., 40.]]))
  np.testing.assert_array_equal(out[:, 0], image[:, 99])
  np.testing.assert_allclose(boxes, [[70., 20., 90., 40.]])


def test_crop_shifts_cuts_and_drops_boxes():
  image = tf.reshape(tf.range(100 * 100 * 3), [100, 100, 3])
  boxes = tf.constant([
      [25., 15., 45., 35.],  # Inside: shifted by (left, top) = (20, 10).
      [0., 0., 30., 30.],    # Cut at the top-left corner.
      [50., 20., 70., 40.],  # Cut at the right edge (x = 20 + 40).
      [60., 20., 80., 40.],  # Touches the crop only along its edge: no area left.
      [70., 70., 90., 90.],  # Outside.
  ])
  labels = tf.constant([1, 2, 3, 4, 5])
  out, boxes, labels = transforms.crop(image, boxes, labels, tf.constant([10, 20, 50, 40]))
  np.testing.assert_array_equal(out, image[10:60, 20:60])
  np.testing.assert_allclose(boxes, [[5., 5., 25., 25.], [0., 0., 10., 20.], [30., 10., 40., 30.]])
  np.testing.assert_array_equal(labels, [1, 2, 3])


def test_apply_geometry_chains_flip_crop_and_resize():
  image = tf.zeros([100, 200, 3], tf.uint8)
  geometry = {'flip': tf.constant(True), 'crop': tf.constant(True),
              'pre_size': tf.constant([50, 100]), 'window': tf.constant([10, 20, 30, 40]),
              'size': tf.constant([60, 80])}
  out, boxes, labels = transforms.apply_geometry(
      image, tf.constant([[0., 0., 100., 100.]]), tf.constant([3]), geometry, geometry['size'])
  # Flip: [100, 0, 200, 100]; x0.5: [50, 0, 100, 50]; minus (20, 10), cut to 40 x 30:
  # [30, 0, 40, 30]; x2 to 80 x 60: [60, 0, 80, 60].
  assert out.shape == (60, 80, 3)
  np.testing.assert_allclose(boxes, [[60., 0., 80., 60.]])
  np.testing.assert_array_equal(labels, [3])


def test_normalize_image_uses_imagenet_statistics():
  out = transforms.normalize_image(tf.constant([[[255, 0, 51]]], tf.uint8))
  np.testing.assert_allclose(
      out[0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, (0.2 - 0.406) / 0.225], rtol=1e-6)


def test_to_normalized_cxcywh():
  out = transforms.to_normalized_cxcywh(tf.constant([[10., 20., 30., 60.]]), 100, 200)
  np.testing.assert_allclose(out, [[0.1, 0.4, 0.1, 0.4]])


def test_boxes_to_original_per_image_of_a_batch():
  boxes = np.array([[[0.5, 0.5, 0.2, 0.4]], [[0.25, 0.5, 0.5, 1.0]]])
  out = transforms.boxes_to_original(boxes, np.array([[100, 200], [10, 20]]))
  np.testing.assert_allclose(out, [[[80., 30., 40., 40.]], [[0., 0., 10., 10.]]])


def test_eval_geometry_is_the_plain_resize():
  aug = transforms.Augmentation(scales=(800,), max_size=1333)
  g = transforms.sample_geometry(427, 640, tf.constant([3, 4]), aug)
  assert not g['flip'] and not g['crop']
  np.testing.assert_array_equal(g['window'], [0, 0, 427, 640])
  np.testing.assert_array_equal(g['size'], [800, 1199])


def test_train_geometry_follows_detr():
  draws = [transforms.sample_geometry(480, 640, tf.constant([7, i]), DETR_TRAIN)
           for i in range(300)]
  flips = np.mean([bool(g['flip']) for g in draws])
  crops = np.mean([bool(g['crop']) for g in draws])
  assert 0.4 < flips < 0.6 and 0.4 < crops < 0.6
  for g in draws:
    size = g['size'].numpy()
    top, left, ch, cw = g['window'].numpy()
    # The last resize: shorter side one of the scales, or the longer side at its 1333 bound.
    assert min(size) in DETR_TRAIN.scales or max(size) in (1332, 1333)
    if g['crop']:
      pre = g['pre_size'].numpy()
      assert min(pre) in (400, 500, 600)
      assert 384 <= ch <= min(600, pre[0]) and 384 <= cw <= min(600, pre[1])
      assert 0 <= top <= pre[0] - ch and 0 <= left <= pre[1] - cw
    else:
      assert (top, left, ch, cw) == (0, 0, 480, 640)
      assert min(size) in DETR_TRAIN.scales and size[1] == int(min(size) * 640 / 480)
  assert len({int(min(g['size'])) for g in draws}) == len(DETR_TRAIN.scales)


def test_train_geometry_is_a_function_of_the_seed():
  a = transforms.sample_geometry(480, 640, tf.constant([1, 2]), DETR_TRAIN)
  b = transforms.sample_geometry(480, 640, tf.constant([1, 2]), DETR_TRAIN)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
