"""COCO-format folders: category mapping, crowd and empty images, and bad input."""

import copy
import logging
import os

import numpy as np
from PIL import Image
import pytest

from qna_detr.data import sources


def _source(json_path, image_dir, skip=False):
  return sources.coco_folder(json_path, image_dir, skip_bad_examples=skip, process_index=0,
                             process_count=1)


def _examples(source):
  return list(source.elements.map(source.load).as_numpy_iterator())


def test_non_contiguous_category_ids_map_and_unmap(real_folder):
  source = _source(*real_folder)
  assert source.category_ids == (44, 64)
  assert source.class_names == ('bottle', 'potted plant')
  by_id = {int(ex['image_id']): ex for ex in _examples(source)}
  np.testing.assert_array_equal(by_id[397133]['labels'], [0])
  np.testing.assert_array_equal(by_id[37777]['labels'], [1])
  np.testing.assert_allclose(by_id[397133]['boxes'], [[217.62, 240.54, 256.61, 298.29]])
  assert by_id[397133]['image'].shape == (427, 640, 3)
  assert [source.category_ids[int(ex['labels'][0])] for ex in by_id.values()] == [44, 64]


def test_crowd_kept_for_evaluation_only_and_empty_images_kept(tmp_path, crowd_data, write_folder):
  source = _source(*write_folder(str(tmp_path), crowd_data))
  by_id = {int(ex['image_id']): ex for ex in _examples(source)}
  assert set(by_id) == {397133, 37777, 5}
  assert len(by_id[397133]['boxes']) == 1  # The crowd annotation is no target.
  assert by_id[5]['boxes'].shape == (0, 4)
  gt = source.ground_truth()
  assert {a['id'] for a in gt['annotations']} == {82445, 22328, 9001}
  assert {im['id'] for im in gt['images']} == {397133, 37777, 5}


def test_shards_split_the_images(tmp_path, crowd_data, write_folder):
  paths = write_folder(str(tmp_path), crowd_data)
  shards = [sources.coco_folder(*paths, skip_bad_examples=False, process_index=i,
                                process_count=2) for i in range(2)]
  ids = [{int(ex['image_id']) for ex in _examples(s)} for s in shards]
  assert not ids[0] & ids[1] and ids[0] | ids[1] == {397133, 37777, 5}
  assert shards[0].num_examples == shards[1].num_examples == 3


def test_unknown_category_id_names_the_annotation(tmp_path, real_data, write_folder):
  real_data['annotations'][1]['category_id'] = 3
  with pytest.raises(ValueError, match=r'annotation 22328 has unknown category id 3'):
    _source(*write_folder(str(tmp_path), real_data))


def test_negative_width_names_the_annotation(tmp_path, real_data, write_folder):
  real_data['annotations'][0]['bbox'][2] = -4.0
  with pytest.raises(ValueError, match=r'annotation 82445 has negative width -4.0'):
    _source(*write_folder(str(tmp_path), real_data))


def test_unreadable_json_names_the_file(tmp_path):
  path = tmp_path / 'instances.json'
  path.write_text('{"images": [')
  with pytest.raises(ValueError, match=f'Unreadable COCO annotation file {path}'):
    _source(str(path), str(tmp_path))


def test_missing_json_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothere.json'):
    _source(str(tmp_path / 'nothere.json'), str(tmp_path))


def test_missing_image_names_the_file(tmp_path, real_data, write_folder):
  json_path, image_dir = write_folder(str(tmp_path), real_data)
  os.remove(os.path.join(image_dir, '000000037777.jpg'))
  with pytest.raises(FileNotFoundError, match=r'image 37777: missing file: .*000000037777\.jpg'):
    _source(json_path, image_dir)


def test_truncated_image_names_the_file(tmp_path, real_data, write_folder):
  json_path, image_dir = write_folder(str(tmp_path), real_data)
  path = os.path.join(image_dir, '000000397133.jpg')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'image 397133: truncated JPEG file .*000000397133\.jpg'):
    _source(json_path, image_dir)


def test_image_of_another_size_names_the_file(tmp_path, real_data, write_folder, write_images):
  json_path, image_dir = write_folder(str(tmp_path), real_data)
  write_images({'images': [{**real_data['images'][1], 'height': 20}]}, image_dir)
  with pytest.raises(ValueError, match=r"image 37777: its size 20 x 352 differs from the "
                     r"annotation file's 230 x 352: .*000000037777\.jpg"):
    _source(json_path, image_dir)
  source = _source(json_path, image_dir, skip=True)  # Skipped, and left out of the truth.
  assert [im['id'] for im in source.ground_truth()['images']] == [397133]


def _damage_middle(path):
  """Overwrites a run of bytes in the middle of the entropy-coded data; the end marker stays."""
  data = bytearray(open(path, 'rb').read())
  middle = len(data) // 2
  data[middle:middle + 300] = b'\x55' * 300
  open(path, 'wb').write(bytes(data))


@pytest.mark.parametrize('damage,problem', [
    (lambda path: open(path, 'w').write('not an image'), 'not a decodable image'),
    (lambda path: open(path, 'wb').write(b'\xff\xd8' + bytes(range(256)) * 4 + b'\xff\xd9'),
     'not a decodable image'),
    (_damage_middle, 'corrupt JPEG data'),
])
def test_undecodable_and_corrupt_images_are_named_or_skipped(tmp_path, real_data, write_folder,
                                                               damage, problem, caplog):
  json_path, image_dir = write_folder(str(tmp_path), real_data)
  path = os.path.join(image_dir, '000000397133.jpg')
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (427, 640, 3), np.uint8)).save(
      path, quality=90)  # Entropy-coded data worth damaging.
  damage(path)
  with pytest.raises(ValueError, match=f'image 397133: {problem}.*000000397133'):
    _source(json_path, image_dir)
  with caplog.at_level(logging.WARNING):
    source = _source(json_path, image_dir, skip=True)
  assert f'image 397133: {problem}' in caplog.text
  assert source.num_examples == 1 and len(_examples(source)) == 1


@pytest.mark.parametrize('change,problem', [
    (lambda data: data['annotations'][0].update(bbox=[700.0, 10.0, 30.0, 40.0]),
     'entirely outside its image'),
    (lambda data: data['annotations'][1].update(id=data['annotations'][0]['id']),
     'an id used by an earlier annotation'),
])
def test_boxes_outside_and_duplicate_ids_are_named_or_skipped(tmp_path, real_data, write_folder,
                                                               change, problem):
  data = copy.deepcopy(real_data)
  change(data)
  json_path, image_dir = write_folder(str(tmp_path), data)
  with pytest.raises(ValueError, match=problem):
    _source(json_path, image_dir)
  source = _source(json_path, image_dir, skip=True)
  assert len(source.ground_truth()['annotations']) == len(data['annotations']) - 1


def test_skip_bad_examples_logs_count_and_list(tmp_path, crowd_data, caplog, write_folder):
  data = copy.deepcopy(crowd_data)
  data['annotations'][0]['bbox'][3] = -1.0  # Annotation 82445 of image 397133.
  data['annotations'].append({'id': 77, 'image_id': 37777, 'category_id': 1,
                              'bbox': [1, 2, 3, 4]})
  json_path, image_dir = write_folder(str(tmp_path), data)
  os.remove(os.path.join(image_dir, 'empty.jpg'))
  with caplog.at_level(logging.WARNING):
    source = _source(json_path, image_dir, skip=True)
  message = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'Skipped 3 bad examples' in message
  assert 'annotation 82445: negative height' in message
  assert 'annotation 77: unknown category id 1' in message
  assert 'image 5: missing file' in message
  assert source.num_examples == 2
  gt = source.ground_truth()
  assert {a['id'] for a in gt['annotations']} == {22328, 9001}
  assert {im['id'] for im in gt['images']} == {397133, 37777}
  by_id = {int(ex['image_id']): ex for ex in _examples(source)}
  assert by_id[397133]['boxes'].shape == (0, 4)


def test_ground_truth_loads_in_pycocotools(real_folder, real_data):
  from pycocotools.coco import COCO
  coco = COCO()
  coco.dataset = _source(*real_folder).ground_truth()
  coco.createIndex()
  assert coco.getCatIds() == [44, 64]
  ann = coco.loadAnns(coco.getAnnIds(imgIds=[397133]))[0]
  assert ann['bbox'] == real_data['annotations'][0]['bbox']
