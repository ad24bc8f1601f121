"""Shared test settings and fixtures: small datasets in temporary folders, and the
compilation cache.

Many tests compile the same small programs (the same micro DETR in several runs, in
subprocesses too); a persistent XLA cache turns every repeat into a load. It lives in the
system's temp dir, so later test runs on the same machine start warm; correctness never depends
on it.
"""
import copy
import json
import os
import sys
import tempfile

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from qna_detr.data import dataset_config
from qna_detr.data import toy
from qna_detr.utils import runtime

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'train'))
import train_testing  # noqa: E402  pylint: disable=g-import-not-at-top

CACHE_DIR = os.path.join(tempfile.gettempdir(), 'qna_detr_test_xla_cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', CACHE_DIR)  # Inherited by subprocesses.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
# Tests compile many small programs and run each a few times: most of XLA's optimizations
# cost more compile time than they save (about a quarter of a micro run's compile). Tests
# that read XLA's memory or cost figures, or run many steps, turn them back on
# (`@pytest.mark.optimized`, or the variable set to 0 for a subprocess).
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
jax.config.update('jax_disable_most_optimizations',
                  os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] == '1')
# Faster CPU steps, as in training (qna_detr.utils.runtime); glibc reads the same
# settings from the environment in the subprocesses that tests start.
runtime.keep_freed_memory_on_cpu()
for _name, _value in runtime.ENVIRONMENT.items():
  os.environ.setdefault(_name, _value)

REAL_JSON = os.path.join(os.path.dirname(__file__), 'data', 'testdata',
                         'coco_val2017_2images.json')
TOY_IMAGE_SIZE = train_testing.TOY_SET['image_size']


def _write_images(data: dict, image_dir: str, colour=(128, 64, 32)) -> None:
  """Writes a uniform JPEG of the listed size for every image of a COCO dict."""
  os.makedirs(image_dir, exist_ok=True)
  for im in data['images']:
    pixels = np.full((im['height'], im['width'], 3), colour, np.uint8)
    Image.fromarray(pixels).save(os.path.join(image_dir, im['file_name']), quality=100)


def _write_folder(root: str, data: dict) -> tuple[str, str]:
  """Writes a COCO folder (annotation file and images); returns (json path, image dir)."""
  image_dir = os.path.join(root, 'images')
  _write_images(data, image_dir)
  path = os.path.join(root, 'instances.json')
  with open(path, 'w') as f:
    json.dump(data, f)
  return path, image_dir


def _folder_config(json_path: str, image_dir: str, **overrides) -> ml_collections.ConfigDict:
  """An experiment config reading the folder as both splits, with DETR's sizes."""
  cfg = dataset_config.default_config()
  cfg.name = 'coco_folder'
  cfg.update({'train_json': json_path, 'train_images': image_dir, 'val_json': json_path,
              'val_images': image_dir, 'bucket_sample_size': 200, **overrides})
  return ml_collections.ConfigDict({'dataset': cfg})


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
  """XLA's optimizations on for the tests marked `optimized`."""
  if request.node.get_closest_marker('optimized') is None:
    yield
    return
  saved = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', saved)


@pytest.fixture
def write_images():
  """write_images(coco_dict, image_dir, colour=(128, 64, 32)): uniform JPEGs of its sizes."""
  return _write_images


@pytest.fixture
def write_folder():
  """write_folder(root, coco_dict) -> (json path, image dir)."""
  return _write_folder


@pytest.fixture
def folder_config():
  """folder_config(json_path, image_dir, **dataset_overrides) -> experiment config."""
  return _folder_config


@pytest.fixture
def real_data() -> dict:
  with open(REAL_JSON) as f:
    return json.load(f)


@pytest.fixture
def real_folder(tmp_path, real_data) -> tuple[str, str]:
  """The 2-image COCO val file with uniform images of its sizes."""
  return _write_folder(str(tmp_path), real_data)


@pytest.fixture(scope='session')
def toy_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('toy') / 'toy')
  toy.make_toy_coco(path, **train_testing.TOY_SET)
  return path


@pytest.fixture
def toy_config(toy_dir) -> ml_collections.ConfigDict:
  cfg = dataset_config.toy_config(toy_dir, image_size=TOY_IMAGE_SIZE)
  cfg.bucket_sample_size = 300
  return ml_collections.ConfigDict({'dataset': cfg})


@pytest.fixture
def crowd_data(real_data) -> dict:
  """The real file plus a crowd annotation and an image without annotations."""
  data = copy.deepcopy(real_data)
  data['annotations'].append({'id': 9001, 'image_id': 397133, 'category_id': 64,
                              'bbox': [10.0, 20.0, 100.0, 50.0], 'area': 5000.0,
                              'iscrowd': 1, 'segmentation': {'counts': [], 'size': [427, 640]}})
  data['images'].append({'id': 5, 'file_name': 'empty.jpg', 'height': 50, 'width': 70})
  return data
