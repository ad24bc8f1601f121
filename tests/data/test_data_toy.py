"""The synthetic shapes dataset and its command-line tool."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from qna_detr import recipes
from qna_detr.data import toy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_dataset_is_consistent_and_varied(toy_dir):
  paths = toy.paths(toy_dir)
  coco = COCO(paths['train_json'])
  assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(toy.CLASSES)
  counts, classes, aspects = [], set(), set()
  for image in coco.loadImgs(coco.getImgIds()):
    with Image.open(os.path.join(paths['train_images'], image['file_name'])) as pixels:
      assert pixels.size == (image['width'], image['height'])
    assert max(image['height'], image['width']) == 64
    aspects.add(round(max(image['height'], image['width'])
                      / min(image['height'], image['width']), 1))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image['id']]))
    counts.append(len(anns))
    for ann in anns:
      x, y, w, h = ann['bbox']
      assert 0 <= x and 0 <= y and x + w <= image['width'] and y + h <= image['height']
      assert 0 < ann['area'] <= w * h
      classes.add(ann['category_id'])
  assert classes == {1, 2, 3, 4, 5}
  assert min(counts) >= 1 and max(counts) <= toy.MAX_OBJECTS and len(set(counts)) >= 3
  assert aspects == {1.0, 1.3, 1.5}


def test_objects_stand_out_from_the_background():
  checked = 0
  for seed in range(20):
    image, objects = toy.render_image(np.random.default_rng([seed, 0, 0]), 96, 128)
    image = image.astype(float)
    for obj in objects:
      x, y, w, h = obj['bbox']
      # Unoccluded rectangles away from the border: one colour (plus grain), unlike the
      # pixels around them.
      if obj['category_id'] != 1 or obj['area'] != w * h or min(x, y) < 3 or \
          x + w > 125 or y + h > 93 or min(w, h) < 6:
        continue
      inside = image[y + 1:y + h - 1, x + 1:x + w - 1].reshape(-1, 3)
      ring = np.concatenate([image[y - 2, x:x + w], image[y + h + 1, x:x + w],
                             image[y:y + h, x - 2], image[y:y + h, x + w + 1]])
      assert inside.std(0).max() < 20
      assert np.linalg.norm(inside.mean(0) - ring.mean(0)) > 40
      checked += 1
  assert checked >= 3


def test_same_seed_same_dataset_and_tool_matches_library(tmp_path):
  toy.make_toy_coco(str(tmp_path / 'lib'), num_train=3, num_val=2, image_size=48, seed=5)
  subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'make_toy_coco.py'),
                  f'--output={tmp_path / "cli"}', '--train=3', '--val=2', '--image_size=48',
                  '--seed=5'], check=True, env={**os.environ, 'PYTHONPATH': REPO}, timeout=120)
  toy.make_toy_coco(str(tmp_path / 'other'), num_train=3, num_val=2, image_size=48, seed=6)
  lib, cli, other = (toy.paths(str(tmp_path / d)) for d in ('lib', 'cli', 'other'))
  for split in ('train', 'val'):
    data = _load(lib[f'{split}_json'])
    assert data == _load(cli[f'{split}_json'])
    assert data['annotations'] != _load(other[f'{split}_json'])['annotations']
    for image in data['images']:
      with open(os.path.join(lib[f'{split}_images'], image['file_name']), 'rb') as a, \
           open(os.path.join(cli[f'{split}_images'], image['file_name']), 'rb') as b:
        assert a.read() == b.read()
  assert len(_load(lib['train_json'])['images']) == 3
  assert [im['id'] for im in _load(lib['val_json'])['images']] == [4, 5]


def test_ensure_makes_once(tmp_path):
  out = toy.ensure_toy_coco(str(tmp_path / 'd'), num_train=2, num_val=1, image_size=32, seed=0)
  stamp = os.path.getmtime(out['train_json'])
  again = toy.ensure_toy_coco(str(tmp_path / 'd'), num_train=2, num_val=1, image_size=32, seed=0)
  assert again == out and os.path.getmtime(out['train_json']) == stamp
  assert len(_load(out['train_json'])['images']) == 2
  assert [p for p in os.listdir(tmp_path) if p.startswith('.toy_coco_')] == []


def test_ensure_refuses_a_dataset_made_with_other_arguments(tmp_path):
  folder = str(tmp_path / 'd')
  out = toy.ensure_toy_coco(folder, num_train=2, num_val=1, image_size=32, seed=0)
  with pytest.raises(ValueError, match=r'other settings: config.toy_data.num_train=2 \(now 5\), '
                                       r'config.toy_data.seed=0 \(now 1\); delete'):
    toy.ensure_toy_coco(folder, num_train=5, num_val=1, image_size=32, seed=1)
  data = _load(out['train_json'])
  del data['info']['toy_params']  # As an older version wrote it.
  with open(out['train_json'], 'w') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=r'config.toy_data.image_size=null \(now 32\)'):
    toy.ensure_toy_coco(folder, num_train=2, num_val=1, image_size=32, seed=0)
  assert len(_load(out['train_json'])['images']) == 2  # Nothing was deleted.


def test_the_datasets_sizes_follow_an_image_size_override(tmp_path):
  """--config.toy_data.image_size=96 on the toy recipe: the resize settings and the padded
  shapes are those of 96-pixel images (hand-computed: DETR's 480..800 step 64 scaled by
  96 / 800 and rounded to 8), not of the recipe's 128."""
  config = recipes.toy()
  config.toy_data.image_size = 96
  resolved = toy.resolve(config, str(tmp_path))
  dataset = resolved.dataset
  assert dataset.train_scales == (56, 64, 72, 80, 88, 96)
  assert (dataset.eval_scale, dataset.train_max_size, dataset.eval_max_size) == (96, 96, 96)
  assert dataset.train_bucket_shapes == dataset.eval_bucket_shapes == ((96, 96),)
  assert dataset.val_json == str(tmp_path / 'toy_coco' / 'annotations' / 'instances_val.json')
  assert recipes.toy().dataset.eval_scale == 128  # The recipe itself is unchanged.
