"""Backbone feature maps of a dataset, written as resumable shards that numpy reads directly.

An export directory holds:
  export_info.json  `settings` (config, checkpoint, step, source, levels, channels, dtype,
                    size, shard_size, num_images, bucket_shapes) and `complete`
  shard-NNNNN.npz   `image_id` int64 [n]; per level s: `stride_<s>` [sum of h*w, C], each
                    image's valid (unpadded) h x w map flattened row-major, images one after
                    the other, and `stride_<s>_hw` int32 [n, 2], the (h, w) of each image
  index.jsonl       one line per image: image_id, file_name, shard, position (in the shard),
                    orig_size and size (resized, unpadded) as [h, w], and per level
                    `stride_<s>`: {offset (first row in the shard's array), h, w}
A shard is written to a temporary file and renamed; its index lines are appended after the
rename. Every shard but the last holds `shard_size` images, so the shards with that many index
lines are complete, and a rerun with the same settings continues after them: images arrive in
the same order every time, and those of complete shards are not computed again.
"""
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qna_detr import parallel
from qna_detr.backbones import base
from qna_detr.backbones import weights
from qna_detr.data import batching
from qna_detr.data.pipeline import DetectionDataset
from qna_detr.utils import files

logger = logging.getLogger(__name__)

DTYPES = {'float32': np.float32, 'float16': np.float16}
INFO, INDEX = 'export_info.json', 'index.jsonl'


def load_backbone_params(backbone: nn.Module, path: str, name: str) -> Any:
  """The parameters of `backbone` (registry name `name`) from a checkpoint, checked.

  `path`: a checkpoint in one of the formats the backbone reads (`weights.FORMATS`): a step
  directory of a detector or classifier of this project, an authors' release, ...
  """
  abstract = {'backbone': base.abstract_init(backbone)[1]}
  params, report = weights.load_backbone(abstract, path, backbone=name)
  if report.missing or report.unexpected:
    raise ValueError(f'The checkpoint {path} does not hold the parameters of this config\'s '
                     f'backbone (was it written with another config?): {report.summary()}')
  return params['backbone']


def make_extract_fn(backbone: nn.Module, strides: Sequence[int], levels: Sequence[int],
                    dtype: str) -> Callable:
  """(params, batch) -> {stride: (features, padding mask)} of the chosen levels.

  The features are cast to `dtype` on the device (half the transfer for float16), saturating
  at its largest finite value rather than overflowing to inf.
  """
  out_dtype = DTYPES[dtype]
  limit = float(np.finfo(out_dtype).max)

  def extract(params, batch):
    pyramid = backbone.apply({'params': params}, batch['inputs'], batch['padding_mask'],
                             train=False)
    chosen = {s: pyramid[strides.index(s)] for s in levels}
    return {s: (jnp.clip(level.features.astype(jnp.float32), -limit, limit).astype(out_dtype),
                level.mask) for s, level in chosen.items()}

  return extract


def _read_index(path: str) -> list[dict]:
  """The index lines up to the first incomplete one (a write cut short)."""
  entries = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if not line.endswith('\n'):
          break
        try:
          entries.append(json.loads(line))
        except json.JSONDecodeError:
          break
  return entries


class ShardWriter:
  """Collects images' feature maps into shards of an export directory (see the module doc).

  Opening a directory that holds an export with the same settings resumes it: `done` lists
  the index entries of its complete shards, and what came after them is removed. A directory
  with another export, or with other files, is refused.
  """

  def __init__(self, output: str, settings: dict[str, Any], shard_size: int):
    if shard_size < 1:
      raise ValueError(f'shard_size must be at least 1, got {shard_size}')
    self._output = output
    self._shard_size = shard_size
    self._info = self._open(settings)
    self.done = self._complete_entries()
    self._pending: list[tuple[dict, dict[int, np.ndarray]]] = []

  @property
  def complete(self) -> bool:
    return self._info['complete']

  def _open(self, settings: dict[str, Any]) -> dict[str, Any]:
    settings = files.as_json(settings)  # Tuples as lists, as they read back.
    path = os.path.join(self._output, INFO)
    if os.path.exists(path):
      with open(path) as f:
        info = json.load(f)
      files.check_settings(info['settings'], settings, f'The export in {self._output}',
                           'rerun with the same arguments to resume it, or choose another '
                           'output directory')
      return info
    if os.path.isdir(self._output) and os.listdir(self._output):
      raise ValueError(f'{self._output} is not empty and holds no {INFO}: choose another '
                       'output directory')
    os.makedirs(self._output, exist_ok=True)
    return {'settings': settings, 'complete': False}  # Saved with the first shard.

  def _save_info(self, info: dict[str, Any]) -> None:
    files.write_atomic(os.path.join(self._output, INFO),
                       lambda f: json.dump(info, f, indent=1), sync=True)

  def _complete_entries(self) -> list[dict]:
    """The index entries of complete shards; later shards and lines are removed."""
    index = os.path.join(self._output, INDEX)
    entries = _read_index(index)
    if self.complete:
      return entries
    entries = entries[:len(entries) // self._shard_size * self._shard_size]
    if os.path.exists(index):
      files.write_atomic(index, lambda f: f.writelines(json.dumps(e) + '\n' for e in entries),
                         sync=True)
    shards = {e['shard'] for e in entries}
    for name in os.listdir(self._output):
      if name.startswith('shard-') and name not in shards:
        os.remove(os.path.join(self._output, name))
    return entries

  @property
  def num_written(self) -> int:
    return len(self.done) + len(self._pending)

  def add(self, meta: dict[str, Any], maps: dict[int, np.ndarray]) -> None:
    """One image: `meta` (image_id, file_name, orig_size, size), and its [h, w, C] maps."""
    self._pending.append((meta, maps))
    if len(self._pending) == self._shard_size:
      self._flush()

  def _flush(self) -> None:
    if not self.done:
      self._save_info(self._info)
    name = f'shard-{len(self.done) // self._shard_size:05d}.npz'
    arrays = {'image_id': np.array([m['image_id'] for m, _ in self._pending], np.int64)}
    entries = [{**meta, 'shard': name, 'position': i} for i, (meta, _) in
               enumerate(self._pending)]
    for stride in self._pending[0][1]:
      key = f'stride_{stride}'
      level = [maps[stride] for _, maps in self._pending]
      hw = np.array([m.shape[:2] for m in level], np.int32).reshape(-1, 2)
      offsets = np.concatenate([[0], np.cumsum(hw.prod(1))[:-1]])
      arrays[key] = np.concatenate([m.reshape(-1, m.shape[-1]) for m in level])
      arrays[f'{key}_hw'] = hw
      for entry, offset, (h, w) in zip(entries, offsets, hw):
        entry[key] = {'offset': int(offset), 'h': int(h), 'w': int(w)}
    files.write_atomic(os.path.join(self._output, name), lambda f: np.savez(f, **arrays),
                       'wb', sync=True)
    with open(os.path.join(self._output, INDEX), 'a') as f:
      f.write(''.join(json.dumps(e) + '\n' for e in entries))
      f.flush()
      os.fsync(f.fileno())
    self.done += entries
    self._pending = []

  def close(self) -> None:
    """Writes the last, partial shard and marks the export complete."""
    if self._pending:
      self._flush()
    self._info['complete'] = True
    self._save_info(self._info)


def _crop(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The valid top-left region of one image's [h, w, C] map (mask True = padding)."""
  return features[:int((~mask[:, 0]).sum()), :int((~mask[0]).sum())]


def _new_images(batches: Iterator[dict[str, np.ndarray]], done_ids: Sequence[int]
                ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """(batch, indices of its real images not exported yet), for batches that have any.

  The images already exported (`done_ids`) must be the first ones of the pass, in order.
  """
  seen = 0
  for batch in batches:
    real = np.flatnonzero(batch['valid'])
    old = real[:max(0, len(done_ids) - seen)]
    if batch['image_id'][old].tolist() != list(done_ids[seen:seen + len(old)]):
      raise ValueError('The images differ from those of the interrupted export (has the '
                       'dataset changed?); export into another output directory')
    seen += len(real)
    if len(old) < len(real):
      yield batch, real[len(old):]


def _log_progress(done: int, total: int, resumed: int, start: float) -> None:
  elapsed = time.time() - start
  rate = (done - resumed) / max(elapsed, 1e-9)
  eta = (total - done) / rate if rate else float('inf')
  logger.info('Exported %d/%d images, %.1f images/s, ETA %.0fs', done, total, rate, eta)


def export(dataset: DetectionDataset, extract_fn: Callable, params: Any, writer: ShardWriter,
           mesh: jax.sharding.Mesh, file_names: dict[int, str] | None = None,
           log_every_s: float = 30.0) -> int:
  """Writes the feature maps of every image of `dataset` not yet in `writer`; returns how
  many were computed. The batch is split over `mesh` (use local devices: one process)."""
  jitted = jax.jit(extract_fn, out_shardings=parallel.replicated(mesh))
  params = jax.device_put(params, parallel.replicated(mesh))
  total, resumed = dataset.num_examples, len(writer.done)
  if resumed:
    logger.info('Resuming after %d exported images', resumed)
  start = last_log = time.time()
  with jax.set_mesh(mesh):
    done_ids = [e['image_id'] for e in writer.done]
    for batch, new in _new_images(dataset.iterator(fixed_length=False), done_ids):
      arrays = batching.to_global_arrays(
          {k: batch[k] for k in ('inputs', 'padding_mask')}, parallel.batch_sharding(mesh))
      levels = jax.device_get(jitted(params, arrays))
      for i in new:
        image_id = int(batch['image_id'][i])
        meta = {'image_id': image_id, 'file_name': (file_names or {}).get(image_id),
                'orig_size': batch['orig_size'][i].tolist(), 'size': batch['size'][i].tolist()}
        writer.add(meta, {s: _crop(f[i], m[i]) for s, (f, m) in levels.items()})
      if time.time() - last_log >= log_every_s:
        _log_progress(writer.num_written, total, resumed, start)
        last_log = time.time()
  writer.close()
  _log_progress(writer.num_written, total, resumed, start)
  return writer.num_written - resumed
