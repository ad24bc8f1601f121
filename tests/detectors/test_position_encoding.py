"""Sine position encoding: hand values and independence from padding."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.detectors.position_encoding import sine_position_encoding


def test_hand_values():
  # 2 x 3 image, 4 channels per axis: frequencies 1, 1, 100, 100 (10000 ** (2 * (k // 2) / 4)).
  pos = np.asarray(sine_position_encoding(jnp.zeros((1, 2, 3), bool), 4))
  assert pos.shape == (1, 2, 3, 8)
  y, x = 1 / 2 * 2 * math.pi, 2 / 3 * 2 * math.pi  # row 1 of 2, column 2 of 3 (1-based)
  expected = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
              math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
  np.testing.assert_allclose(pos[0, 0, 1], expected, atol=1e-5)
  # The last valid row and column sit at 2 pi: sin 0, cos 1.
  np.testing.assert_allclose(pos[0, 1, 2, [0, 1, 4, 5]], [0, 1, 0, 1], atol=1e-5)


def test_valid_region_ignores_padding():
  unpadded = sine_position_encoding(jnp.zeros((1, 3, 5), bool), 8)
  mask = np.ones((2, 6, 8), bool)
  mask[0, :3, :5] = False
  mask[1, :6, :8] = False
  padded = sine_position_encoding(jnp.asarray(mask), 8)
  np.testing.assert_allclose(padded[0, :3, :5], unpadded[0], atol=1e-6)
  full = sine_position_encoding(jnp.zeros((1, 6, 8), bool), 8)
  np.testing.assert_allclose(padded[1], full[0], atol=1e-6)
  assert np.isfinite(padded).all()


@pytest.mark.parametrize('num_pos_feats', [0, 3])
def test_rejects_odd_feature_count(num_pos_feats):
  with pytest.raises(ValueError, match='num_pos_feats'):
    sine_position_encoding(jnp.zeros((1, 2, 2), bool), num_pos_feats)
