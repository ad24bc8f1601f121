"""The public pipeline: batch contract, round trip, determinism, eval passes, sharding."""

import itertools
import os

import ml_collections
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pytest

from qna_detr.data import dataset_config
from qna_detr.data import pipeline
from qna_detr.data import toy
from qna_detr.data import transforms

CONTRACT = {
    'inputs': (np.float32, 4), 'padding_mask': (np.bool_, 3), 'boxes': (np.float32, 3),
    'labels': (np.int32, 2), 'box_mask': (np.bool_, 2), 'image_id': (np.int64, 1),
    'orig_size': (np.int32, 2), 'size': (np.int32, 2), 'valid': (np.bool_, 1),
}


def _check_batch(batch, batch_size, max_boxes, bucket_shapes):
  assert {k: (v.dtype.type, v.ndim) for k, v in batch.items()} == CONTRACT
  assert all(len(v) == batch_size for v in batch.values())
  height, width = batch['inputs'].shape[1:3]
  assert (height, width) in bucket_shapes
  assert batch['boxes'].shape == (batch_size, max_boxes, 4)
  rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
  for i in range(batch_size):
    h, w = batch['size'][i]
    padded = (rows >= h) | (cols >= w)
    np.testing.assert_array_equal(batch['padding_mask'][i], padded)
    assert not batch['inputs'][i][padded].any()
    boxes = batch['boxes'][i]
    assert not boxes[~batch['box_mask'][i]].any()
    real = boxes[batch['box_mask'][i]]
    assert (real > 0).all() and (real[:, :2] < 1).all() and (real[:, 2:] <= 1).all()


def test_round_trip_to_original_boxes(real_folder, real_data, folder_config):
  config = folder_config(*real_folder)
  ds = pipeline.build_dataset(config, split='val', global_batch_size=2, shuffle_seed=0,
                              train=False)
  batches = list(ds)
  assert sum(b['valid'].sum() for b in batches) == 2
  originals = {a['image_id']: a for a in real_data['annotations']}
  sizes = {397133: ((427, 640), (800, 1199)), 37777: ((230, 352), (800, 1224))}
  for batch in batches:
    _check_batch(batch, 2, 100, ds.bucket_shapes)
    for i in np.flatnonzero(batch['valid']):
      image_id = int(batch['image_id'][i])
      assert (tuple(batch['orig_size'][i]), tuple(batch['size'][i])) == sizes[image_id]
      mask = batch['box_mask'][i]
      boxes = transforms.boxes_to_original(batch['boxes'][i][mask], batch['orig_size'][i])
      np.testing.assert_allclose(boxes, [originals[image_id]['bbox']], atol=1e-3)
      labels = batch['labels'][i][mask]
      assert [ds.category_ids[l] for l in labels] == [originals[image_id]['category_id']]
      h, w = batch['size'][i]
      # The uniform (128, 64, 32) image, ImageNet-normalized (up to JPEG rounding).
      expected = ((np.array([128, 64, 32]) / 255 - transforms.IMAGENET_MEAN)
                  / transforms.IMAGENET_STD)
      np.testing.assert_allclose(batch['inputs'][i, :h, :w],
                                 np.broadcast_to(expected, (h, w, 3)), atol=0.05)
  assert ds.num_classes == 2 and ds.category_ids == (44, 64)


def test_train_batches_follow_the_contract(toy_config):
  ds = pipeline.build_dataset(toy_config, split='train', global_batch_size=4, shuffle_seed=0,
                              train=True)
  assert len(ds.bucket_shapes) <= 8
  assert all(h % 32 == 0 and w % 32 == 0 for h, w in ds.bucket_shapes)
  batches = list(itertools.islice(ds, 12))  # Two epochs of 24 images: it repeats.
  for batch in batches:
    _check_batch(batch, 4, 100, ds.bucket_shapes)
    assert batch['valid'].all()
    assert (batch['labels'][batch['box_mask']] < ds.num_classes).all()
  assert ds.num_examples == 24 and ds.class_names == ('rectangle', 'ellipse', 'triangle',
                                                     'cross', 'ring')


def test_train_order_and_augmentation_follow_the_seed(toy_config):
  def first(seed):
    ds = pipeline.build_dataset(toy_config, split='train', global_batch_size=4,
                                shuffle_seed=seed, train=True)
    return list(itertools.islice(ds, 3))

  a, b, c = first(1), first(1), first(2)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(x['inputs'].shape != z['inputs'].shape or not np.array_equal(x['boxes'], z['boxes'])
             for x, z in zip(a, c))


def test_eval_visits_every_example_once_and_scores_perfect_detections(toy_config):
  ds = pipeline.build_dataset(toy_config, split='val', global_batch_size=4, shuffle_seed=0,
                              train=False)
  gt = ds.coco_ground_truth()
  detections, seen = [], []
  for batch in ds:
    _check_batch(batch, 4, 100, ds.bucket_shapes)
    assert not batch['box_mask'][~batch['valid']].any()
    for i in np.flatnonzero(batch['valid']):
      seen.append(int(batch['image_id'][i]))
      mask = batch['box_mask'][i]
      boxes = transforms.boxes_to_original(batch['boxes'][i][mask], batch['orig_size'][i])
      for box, label in zip(boxes, batch['labels'][i][mask]):
        detections.append({'image_id': seen[-1], 'category_id': ds.category_ids[label],
                           'bbox': box.tolist(), 'score': 1.0})
  assert sorted(seen) == sorted(im['id'] for im in gt['images'])
  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  evaluator = COCOeval(coco, coco.loadRes(detections), 'bbox')
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  assert evaluator.stats[0] == pytest.approx(1.0)


def test_processes_read_disjoint_shards_with_equal_eval_lengths(toy_config):
  ids, lengths = [], []
  for index in range(2):
    ds = pipeline.build_dataset(toy_config, split='val', global_batch_size=4, shuffle_seed=0,
                                train=False, process_index=index, process_count=2)
    batches = list(ds)
    assert all(len(b['valid']) == 2 for b in batches)
    ids.append({int(i) for b in batches for i in b['image_id'][b['valid']]})
    lengths.append(len(batches))
    assert len(batches) == ds.num_batches
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 10
  assert lengths[0] == lengths[1]


def test_toy_dataset_is_made_by_its_phase_then_read_as_a_coco_folder(tmp_path):
  cfg = dataset_config.toy_config(image_size=64)
  cfg.bucket_sample_size = 100
  config = ml_collections.ConfigDict({'dataset': cfg, 'toy_data': dict(
      num_train=6, num_val=3, image_size=64, seed=0, data_dir='')})
  config = toy.prepare(config, str(tmp_path))
  assert config.dataset.name == 'coco_folder'
  assert config.dataset.val_json == str(tmp_path / 'toy_coco' / 'annotations' /
                                        'instances_val.json')
  ds = pipeline.build_dataset(config, split='val', global_batch_size=2, shuffle_seed=0,
                              train=False)
  assert ds.num_examples == 3
  assert os.path.exists(tmp_path / 'toy_coco' / 'annotations' / 'instances_train.json')


def test_explicit_bucket_shapes_are_used(toy_config):
  toy_config.dataset.eval_bucket_shapes = [[128, 128]]
  ds = pipeline.build_dataset(toy_config, split='val', global_batch_size=4, shuffle_seed=0,
                              train=False)
  assert ds.bucket_shapes == ((128, 128),)
  assert {b['inputs'].shape[1:3] for b in ds} == {(128, 128)}


def test_explicit_bucket_shapes_must_hold_the_largest_images(toy_config):
  toy_config.dataset.eval_bucket_shapes = [[64, 128]]  # Landscape only.
  with pytest.raises(ValueError, match='eval_bucket_shapes .* 107 x 64'):
    pipeline.build_dataset(toy_config, split='val', global_batch_size=4, shuffle_seed=0,
                           train=False)


@pytest.mark.parametrize('overrides, split, match', [
    ({'name': 'imagenet'}, 'train', 'Unknown config.dataset.name'),
    ({}, 'test', "split must be 'train' or 'val'"),
    ({'train_json': ''}, 'train', 'config.dataset.train_json must be set'),
])
def test_bad_config_is_named(toy_config, overrides, split, match):
  toy_config.dataset.update(overrides)
  with pytest.raises(ValueError, match=match):
    pipeline.build_dataset(toy_config, split=split, global_batch_size=4, shuffle_seed=0,
                           train=True)
