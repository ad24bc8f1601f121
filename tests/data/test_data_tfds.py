"""The TFDS coco/2017 path under `tfds.testing.mock_data`, with known examples."""

import ml_collections
import numpy as np
from pycocotools.coco import COCO
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from qna_detr.data import dataset_config
from qna_detr.data import pipeline
from qna_detr.data import transforms

# (height, width), objects: normalized (ymin, xmin, ymax, xmax), label, crowd.
EXAMPLES = [
    ((60, 80), [((0.1, 0.2, 0.5, 0.6), 0, False), ((0.0, 0.0, 1.0, 1.0), 79, True)]),
    ((40, 40), [((0.25, 0.5, 0.75, 1.0), 5, False)]),
    ((50, 90), []),
]


def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
  """TFDS's reading path on EXAMPLES: encode with the real features, decode with decoders."""
  del split, read_config, shuffle_files
  features = self.info.features
  encoded = []
  for index, ((h, w), objects) in enumerate(EXAMPLES):
    encoded.append(features.encode_example({
        'image': np.full((h, w, 3), 90, np.uint8),
        'image/filename': f'{index}.jpg',
        'image/id': 100 + index,
        'objects': {
            'id': [1000 + 10 * index + j for j in range(len(objects))],
            'area': [int(100 * (j + 1)) for j in range(len(objects))],
            'bbox': [tfds.features.BBox(*box) for box, _, _ in objects],
            'label': [label for _, label, _ in objects],
            'is_crowd': [crowd for _, _, crowd in objects],
        }}))
  signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.tf_dtype),
                                    features.get_serialized_info())
  ds = tf.data.Dataset.from_generator(lambda: iter(encoded), output_signature=signature)
  ds = ds.apply(tf.data.experimental.assert_cardinality(len(encoded)))
  return ds.map(lambda ex: features.decode_example(ex, decoders=decoders))


@pytest.fixture
def tfds_config():
  cfg = dataset_config.default_config()
  cfg.update({'train_scales': [64], 'train_max_size': 128, 'crop_resize_scales': [48],
              'crop_min_size': 32, 'crop_max_size': 48, 'eval_scale': 64, 'eval_max_size': 128,
              'max_boxes': 4, 'bucket_sample_size': 50})
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset):
    yield ml_collections.ConfigDict({'dataset': cfg})


def test_eval_batches_round_trip(tfds_config):
  ds = pipeline.build_dataset(tfds_config, split='val', global_batch_size=3, shuffle_seed=0,
                              train=False)
  assert ds.num_examples == 3 and ds.num_classes == 80
  assert (ds.category_ids[0], ds.category_ids[5], ds.category_ids[79]) == (1, 6, 90)
  expected = {100: ([[16.0, 6.0, 32.0, 24.0]], [0], (64, 85)),  # Crowd box left out.
              101: ([[20.0, 10.0, 20.0, 20.0]], [5], (64, 64)),
              102: (np.zeros((0, 4)), [], (64, 115))}
  seen = set()
  for batch in ds:
    for i in np.flatnonzero(batch['valid']):
      image_id = int(batch['image_id'][i])
      seen.add(image_id)
      boxes, labels, size = expected[image_id]
      mask = batch['box_mask'][i]
      np.testing.assert_allclose(
          transforms.boxes_to_original(batch['boxes'][i][mask], batch['orig_size'][i]),
          np.reshape(boxes, (-1, 4)), atol=1e-4)
      np.testing.assert_array_equal(batch['labels'][i][mask], labels)
      assert tuple(batch['size'][i]) == size
  assert seen == set(expected)


def test_ground_truth_from_examples(tfds_config):
  ds = pipeline.build_dataset(tfds_config, split='val', global_batch_size=3, shuffle_seed=0,
                              train=False)
  gt = ds.coco_ground_truth()
  assert [(im['id'], im['height'], im['width']) for im in gt['images']] == [
      (100, 60, 80), (101, 40, 40), (102, 50, 90)]
  anns = {a['id']: a for a in gt['annotations']}
  assert set(anns) == {1000, 1001, 1010}
  assert anns[1001]['iscrowd'] == 1 and anns[1001]['category_id'] == 90
  np.testing.assert_allclose(anns[1000]['bbox'], [16.0, 6.0, 32.0, 24.0], atol=1e-4)
  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  assert coco.loadCats(1)[0]['name'] == tfds.builder('coco/2017').info.features['objects'][
      'label'].names[0]


def test_train_batches(tfds_config):
  ds = pipeline.build_dataset(tfds_config, split='train', global_batch_size=2, shuffle_seed=0,
                              train=True)
  it = iter(ds)
  for _ in range(4):
    batch = next(it)
    assert batch['inputs'].shape[0] == 2 and batch['inputs'].shape[1:3] in ds.bucket_shapes
    assert set(batch['image_id']) <= {100, 101, 102}
    assert set(batch['labels'][batch['box_mask']]) <= {0, 5}
