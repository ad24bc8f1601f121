"""Bucket choice, bucket derivation, batch padding and global arrays."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qna_detr.data import batching


def _assign(sizes, buckets, max_rescale):
  index, size = batching.assign_buckets(np.array(sizes), np.array(buckets), max_rescale)
  return index.numpy().tolist(), size.numpy().tolist()


def test_assign_exact_fit_without_rescaling():
  # (100, 140) does not fit (96, 160); in (128, 160) it leaves 20480 - 14000 padded pixels.
  assert _assign([[100, 140]], [[96, 160], [128, 160]], 1.0) == ([1], [[100, 140]])


def test_assign_rescales_within_bound():
  # With 5%: into (96, 160) shrunk by 0.96 to (96, 134): 15360 - 12864 = 2496 padded pixels;
  # into (128, 160) enlarged by 1.05 to (105, 147): 20480 - 15435 = 5045.
  assert _assign([[100, 140]], [[96, 160], [128, 160]], 1.05) == ([0], [[96, 134]])


def test_assign_shrinks_what_fits_nowhere():
  # (300, 300) needs shrinking by 0.43 for (128, 128), by 0.21 for (64, 256): least shrinking.
  assert _assign([[300, 300]], [[128, 128], [64, 256]], 1.05) == ([0], [[128, 128]])


def test_padding_waste():
  waste = batching.padding_waste(np.array([[100, 140], [64, 64]]), [(128, 160), (64, 64)], 1.0)
  assert waste == pytest.approx((20480 - 14000) / (20480 + 4096))


def test_derive_buckets_covers_and_fits_the_sample():
  sizes = np.array([[100, 140]] * 10 + [[50, 60]] * 10)
  buckets = batching.derive_buckets(sizes, num_buckets=4, multiple=4,
                                    max_output_shape=(100, 140), max_rescale=1.0)
  # The two covers, and the smallest multiple-of-4 shape holding (50, 60); a fourth shape
  # would not reduce the padding.
  assert buckets == ((52, 60), (100, 140), (140, 100))


def test_derive_buckets_matches_exhaustive_search():
  rng = np.random.default_rng(0)
  short = rng.integers(60, 100, 300)
  sizes = np.stack([short, (short * rng.uniform(1, 1.6, 300)).astype(int)], -1)
  sizes[::3] = sizes[::3, ::-1]
  covers = [(112, 160), (160, 112)]
  buckets = batching.derive_buckets(sizes, num_buckets=4, multiple=16,
                                    max_output_shape=(100, 160), max_rescale=1.0)
  sides = np.arange(16, 161, 16)
  candidates = np.stack(np.meshgrid(sides, sides, indexing='ij'), -1).reshape(-1, 2)

  def areas(shapes):  # [n, k]: bucket area where the size fits, else inf.
    shapes = np.asarray(shapes)
    fits = (sizes[:, None] <= shapes[None]).all(-1)
    return np.where(fits, shapes.prod(-1)[None], np.inf)

  base = areas(covers).min(1)
  per_candidate = areas(candidates)
  best = min(np.minimum(base, np.minimum(per_candidate[:, i], per_candidate[:, j])).sum()
             for i in range(len(candidates)) for j in range(i + 1, len(candidates)))
  assert set(covers) <= set(buckets) and len(buckets) == 4
  assert areas(buckets).min(1).sum() == best


def _batch(n=1, h=2, w=3):
  return {
      'inputs': np.ones((n, h, w, 3), np.float32),
      'padding_mask': np.zeros((n, h, w), bool),
      'boxes': np.full((n, 2, 4), 0.5, np.float32),
      'labels': np.ones((n, 2), np.int32),
      'box_mask': np.ones((n, 2), bool),
      'image_id': np.arange(1, n + 1, dtype=np.int64),
      'orig_size': np.full((n, 2), 9, np.int32),
      'size': np.array([[h, w]] * n, np.int32),
      'valid': np.ones((n,), bool),
  }


def test_pad_batch_pads_images_and_masks():
  out = batching.pad_batch(_batch(), (4, 5))
  assert out['inputs'].shape == (1, 4, 5, 3)
  assert out['inputs'][0, :2, :3].min() == 1 and out['inputs'][0, 2:].max() == 0
  assert out['inputs'][0, :, 3:].max() == 0
  expected_mask = np.ones((4, 5), bool)
  expected_mask[:2, :3] = False
  np.testing.assert_array_equal(out['padding_mask'][0], expected_mask)
  np.testing.assert_array_equal(out['boxes'], _batch()['boxes'])
  with pytest.raises(ValueError, match='smaller'):
    batching.pad_batch(_batch(), (1, 5))


def test_pad_to_batch_size_appends_fillers():
  out = batching.pad_to_batch_size(_batch(), 3)
  np.testing.assert_array_equal(out['valid'], [True, False, False])
  np.testing.assert_array_equal(out['box_mask'][1:], False)
  np.testing.assert_array_equal(out['padding_mask'][1:], False)
  np.testing.assert_array_equal(out['size'][1:], [[2, 3], [2, 3]])
  np.testing.assert_array_equal(out['orig_size'][1:], [[2, 3], [2, 3]])
  assert out['inputs'][1:].max() == 0
  assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in _batch().items()}


def test_to_global_arrays_splits_the_batch_over_devices(tmp_path):
  script = textwrap.dedent("""
      import jax, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec
      from qna_detr.data import batching
      mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
      batch = {'inputs': np.arange(4 * 3, dtype=np.float32).reshape(4, 3),
               'valid': np.array([True, True, True, False])}
      out = batching.to_global_arrays(batch, NamedSharding(mesh, PartitionSpec('data')))
      for key, array in out.items():
        assert array.shape == batch[key].shape, key
        shards = sorted(array.addressable_shards, key=lambda s: s.device.id)
        for i, shard in enumerate(shards):
          np.testing.assert_array_equal(shard.data, batch[key][2 * i:2 * i + 2])
      print('ok')
  """)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().endswith('ok')
