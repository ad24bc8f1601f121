"""tools/export_features.py and qna_detr/export/features.py on the micro config.

The exported maps are read back with numpy alone (following the documented layout) and
compared with the backbone applied directly, by the test, to the same images.
"""
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from qna_detr import detectors
from qna_detr import parallel
from qna_detr.backbones import registry
from qna_detr.data import pipeline
from qna_detr.export import features
from qna_detr.train import checkpoints
from qna_detr.train import train_step
from qna_detr.train import phases
from qna_detr.utils import checkpoint_io

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tests' / 'train'))
import train_testing  # noqa: E402

pytestmark = pytest.mark.slow  # Subprocesses: the tools and the launcher.

STEP = 3
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope='module')
def run(toy_dir, tmp_path_factory):
  """A workdir holding a detector checkpoint of the micro config; its backbone's params."""
  root = tmp_path_factory.mktemp('export')
  workdir = str(root / 'workdir')
  config_file = train_testing.write_config_file(root / 'micro_config.py', toy_dir)
  config = phases.prepare(train_testing.micro_config(toy_dir), workdir)
  model = detectors.build(config, num_classes=3)  # Any head: only the backbone is read.
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                       train_step.abstract_state(config, model))
  params = _random_params(state.params['backbone'])
  state = state.replace(step=np.int32(STEP), params={**state.params, 'backbone': params})
  backbone = registry.build(config.model)
  jitted = jax.jit(lambda p, images, mask: backbone.apply({'params': p}, images, mask))
  apply = functools.partial(jitted, params)
  checkpointer = checkpoints.Checkpointer(workdir, keep=1)
  checkpointer.save(STEP, state)
  checkpointer.close()
  return {'config': config, 'config_file': str(config_file), 'workdir': workdir,
          'backbone': backbone, 'params': params, 'apply': apply}


def _random_params(zeros):
  """Random weights of a fan-in scale, norm scales near 1 (no compiled init needed)."""
  rng = np.random.default_rng(42)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 100
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, zeros)


def _tool(run, args: list[str]) -> subprocess.CompletedProcess:
  return train_testing.run_script(
      'tools/export_features.py',
      [f'--config={run["config_file"]}', f'--workdir={run["workdir"]}'] + args, timeout=600)


def _read_export(out: pathlib.Path) -> tuple[list[dict], dict[int, dict[int, np.ndarray]]]:
  """Index entries and {image_id: {stride: [h, w, C]}}, read with numpy by the format alone."""
  entries = [json.loads(line) for line in (out / 'index.jsonl').read_text().splitlines()]
  maps = {}
  for entry in entries:
    with np.load(out / entry['shard']) as shard:
      assert shard['image_id'][entry['position']] == entry['image_id']
      levels = {}
      for key in (k for k in shard.files if k.startswith('stride_') and
                  not k.endswith('_hw')):
        place = entry[key]
        assert tuple(shard[f'{key}_hw'][entry['position']]) == (place['h'], place['w'])
        rows = shard[key][place['offset']:place['offset'] + place['h'] * place['w']]
        levels[int(key.split('_')[1])] = rows.reshape(place['h'], place['w'], -1)
    maps[entry['image_id']] = levels
  return entries, maps


def _val_dataset(run):
  return pipeline.build_dataset(run['config'], split='val', global_batch_size=4,
                                shuffle_seed=0, train=False)


def _expected_split_maps(run) -> dict[int, dict[int, np.ndarray]]:
  """The backbone on the pipeline's batches; each map cut to ceil(size / stride)."""
  expected = {}
  for batch in _val_dataset(run):
    pyramid = run['apply'](batch['inputs'], batch['padding_mask'])
    for i in np.flatnonzero(batch['valid']):
      h, w = batch['size'][i]
      expected[int(batch['image_id'][i])] = {
          s: np.asarray(level.features[i, :-(-h // s), :-(-w // s)])
          for s, level in zip((4, 8, 16), pyramid)}
  return expected


def _export_in_process(run, out: pathlib.Path, *, dtype='float32', shard_size=3) -> int:
  dataset = _val_dataset(run)
  levels = [8, 16]
  settings = {'levels': levels, 'dtype': dtype, 'num_images': dataset.num_examples}
  writer = features.ShardWriter(str(out), settings, shard_size)
  extract_fn = features.make_extract_fn(run['backbone'], [4, 8, 16], levels, dtype)
  return features.export(dataset, extract_fn, run['params'], writer,
                         parallel.data_mesh(jax.local_devices()))


def test_split_export_equals_the_backbone_output(run, tmp_path):
  out = tmp_path / 'features'
  result = _tool(run, ['--split=validation', f'--output={out}', '--levels=8,16',
                       '--shard_size=3'])
  assert result.returncode == 0, result.stderr[-4000:]
  entries, maps = _read_export(out)
  expected = _expected_split_maps(run)
  assert sorted(e['image_id'] for e in entries) == sorted(expected)  # Each image once.
  for image_id, levels in maps.items():
    assert sorted(levels) == [8, 16]
    for s, value in levels.items():
      assert value.dtype == np.float32 and value.shape == expected[image_id][s].shape
      np.testing.assert_allclose(value, expected[image_id][s], rtol=1e-5, atol=1e-5)
  with open(run['config'].dataset.val_json) as f:
    truth = {im['id']: im for im in json.load(f)['images']}
  for e in entries:
    image = truth[e['image_id']]
    assert e['file_name'] == image['file_name']
    assert e['orig_size'] == [image['height'], image['width']]
  info = json.loads((out / 'export_info.json').read_text())
  assert info['complete'] and info['settings']['step'] == STEP
  assert info['settings']['levels'] == [8, 16] and info['settings']['dtype'] == 'float32'
  assert info['settings']['config']['model']['backbone'] == 'qna_vit_nano'
  assert 'images/s' in result.stderr and 'ETA' in result.stderr

  _export_in_process(run, tmp_path / 'half', dtype='float16')
  _, half = _read_export(tmp_path / 'half')
  for image_id, levels in half.items():
    for s, value in levels.items():
      assert value.dtype == np.float16
      np.testing.assert_allclose(value.astype(np.float32), expected[image_id][s],
                                 rtol=2e-3, atol=2e-3)


def test_interrupted_export_resumes_after_its_last_complete_shard(run, tmp_path, monkeypatch):
  _export_in_process(run, tmp_path / 'straight')
  out = tmp_path / 'resumed'

  class Killed(Exception):
    pass

  savez, calls = np.savez, []

  def savez_then_die(file, **arrays):
    calls.append(1)
    if len(calls) == 3:  # The third shard is cut short.
      file.write(b'partial')
      raise Killed
    savez(file, **arrays)

  monkeypatch.setattr(np, 'savez', savez_then_die)
  with pytest.raises(Killed):
    _export_in_process(run, out)
  monkeypatch.setattr(np, 'savez', savez)
  assert sorted(os.listdir(out)) == ['export_info.json', 'index.jsonl', 'shard-00000.npz',
                                     'shard-00001.npz', 'shard-00002.npz.tmp']
  # Then as if killed after shard 2 was renamed, while its index lines were being written.
  shutil.copy(tmp_path / 'straight' / 'shard-00002.npz', out)
  lines = (tmp_path / 'straight' / 'index.jsonl').read_text().splitlines(keepends=True)
  with open(out / 'index.jsonl', 'a') as f:
    f.write(lines[6] + lines[7][:20])

  assert _export_in_process(run, out) == 10 - 2 * 3  # Only the images after shard 1.
  entries, maps = _read_export(out)
  straight_entries, straight = _read_export(tmp_path / 'straight')
  ids = [e['image_id'] for e in entries]
  assert sorted(ids) == sorted(set(ids)) == sorted(straight)
  assert entries == straight_entries
  for image_id, levels in straight.items():
    for s, value in levels.items():
      np.testing.assert_array_equal(maps[image_id][s], value)
  assert not [n for n in os.listdir(out) if n.endswith('.tmp')]
  assert _export_in_process(run, out) == 0  # Complete: nothing more to do.
  with pytest.raises(ValueError, match=r'other settings: dtype="float32" \(now "float16"\)'):
    _export_in_process(run, out, dtype='float16')


def _expected_folder_maps(run, path: pathlib.Path,
                          size: tuple[int, int]) -> dict[int, np.ndarray]:
  """The backbone on one image alone: PIL decode, antialiased resize, ImageNet normalization."""
  pixels = np.asarray(Image.open(path).convert('RGB'))
  resized = tf.image.resize(pixels, size, antialias=True).numpy()
  resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
  normalized = (resized.astype(np.float32) / 255.0 - MEAN) / STD
  pyramid = run['apply'](normalized[None], np.zeros((1,) + size, bool))
  return {s: np.asarray(level.features[0]) for s, level in zip((4, 8, 16), pyramid)}


def test_image_folder_skips_unreadable_files(run, tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  # Original (height, width) -> with the longer side 48: shrunk, shrunk portrait, enlarged.
  sizes = {'a.png': ((40, 80), (24, 48)), 'b.png': ((80, 40), (48, 24)),
           'c.png': ((20, 40), (24, 48))}
  for name, (shape, _) in sizes.items():
    Image.fromarray(rng.integers(0, 256, shape + (3,), np.uint8)).save(images / name)
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(images / 'whole.jpg')
  jpeg = (images / 'whole.jpg').read_bytes()
  (images / 'whole.jpg').unlink()
  (images / 'cut.jpg').write_bytes(jpeg[:len(jpeg) // 2])
  (images / 'broken.jpg').write_bytes(rng.bytes(500))
  (images / 'notes.txt').write_text('not an image')

  out = tmp_path / 'features'
  # Buckets derived for --size with sides a multiple of 64: the one shape 64 x 64.
  result = _tool(run, [f'--image_dir={images}', f'--output={out}', '--size=48',
                       '--levels=8,16', '--config.dataset.bucket_multiple=64'])
  assert result.returncode == 0, result.stderr[-4000:]
  for name in ('cut.jpg', 'broken.jpg', 'notes.txt'):
    assert f'Skipping {images / name}: ' in result.stderr
  assert f'Skipped 3 file(s) of {images} that are not readable images' in result.stderr
  entries, maps = _read_export(out)
  assert sorted(e['file_name'] for e in entries) == sorted(sizes)
  for e in entries:
    orig, size = sizes[e['file_name']]
    assert e['orig_size'] == list(orig) and e['size'] == list(size)
    expected = _expected_folder_maps(run, images / e['file_name'], size)
    for s, value in maps[e['image_id']].items():
      assert value.shape == expected[s].shape  # An image alone: its maps are all valid.
      np.testing.assert_allclose(value, expected[s], rtol=1e-4, atol=1e-4)


def test_backbone_params_from_a_step_directory(run, tmp_path):
  step_dir = os.path.join(run['workdir'], 'checkpoints', str(STEP))
  name = run['config'].model.backbone
  loaded = features.load_backbone_params(run['backbone'], step_dir, name)
  jax.tree.map(np.testing.assert_array_equal, loaded, run['params'])
  partial = {k: v for k, v in run['params'].items() if k != 'stem'}
  directory = checkpoint_io.CheckpointDir(str(tmp_path / 'partial'), create=True)
  directory.save(1, {'params': {'backbone': partial}})
  directory.close()
  with pytest.raises(ValueError, match=r'not hold the parameters .* 1 missing \[stem/kernel\]'):
    features.load_backbone_params(run['backbone'], str(tmp_path / 'partial' / '1'), name)


def test_unavailable_level_names_the_flag(run, tmp_path):
  result = _tool(run, ['--split=validation', f'--output={tmp_path / "features"}',
                       '--levels=8,32'])
  assert result.returncode != 0
  assert '--levels=8,32: stride(s) [32] not available' in result.stderr
  assert 'strides [4, 8, 16]' in result.stderr
