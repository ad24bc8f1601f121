"""The trained detector as serialized `jax.export` programs that run with jax alone.

One program per input shape H x W (the run's evaluation bucket shapes by default), batch size
symbolic. A program takes
  images       uint8 [B, H, W, 3]  each image resized as evaluation resizes it (`preprocess`
                                    in model.json), at the top left; the rest is padding
  sizes        int32 [B, 2]        (height, width) of each resized image inside H x W
  orig_sizes   int32 [B, 2]        (height, width) of each original image
and returns, best first (top_k per image),
  boxes        float32 [B, K, 4]   x0, y0, x1, y1 in original pixels
  scores       float32 [B, K]
  labels       int32 [B, K]        contiguous labels; class_names[label] in model.json
ImageNet normalization and the padding mask are computed inside. The parameters are part of
the program. Load with `jax.export.deserialize(open(path, 'rb').read()).call(...)`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp

from qna_detr import detectors
from qna_detr import workdir as run_files
from qna_detr.data import transforms

INFO = 'model.json'


def serving_fn(detector: detectors.DetectorDef, params: Any, top_k: int) -> Callable:
  """(images, sizes, orig_sizes) -> {'boxes', 'scores', 'labels'} (see the module doc)."""
  mean = jnp.asarray(transforms.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(transforms.IMAGENET_STD, jnp.float32)

  def serve(images, sizes, orig_sizes):
    height, width = images.shape[1:3]
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    mask = (rows >= sizes[:, :1, None]) | (cols >= sizes[:, None, 1:])
    inputs = (images.astype(jnp.float32) / 255.0 - mean) / std
    inputs = jnp.where(mask[..., None], 0.0, inputs)
    found = detector.predict(params, inputs, mask, orig_sizes, top_k)
    xy, wh = found['boxes'][..., :2], found['boxes'][..., 2:]
    return {'boxes': jnp.concatenate([xy, xy + wh], -1), 'scores': found['scores'],
            'labels': found['labels'].astype(jnp.int32)}

  return serve


def export_shape(serve: Callable, shape: Sequence[int], platforms: Sequence[str] | None
                 ) -> jax.export.Exported:
  """`serve` exported for H x W inputs and any batch size."""
  batch, = jax.export.symbolic_shape('batch')
  height, width = shape
  args = (jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8),
          jax.ShapeDtypeStruct((batch, 2), jnp.int32),
          jax.ShapeDtypeStruct((batch, 2), jnp.int32))
  return jax.export.export(jax.jit(serve), platforms=platforms)(*args)


def export(run: run_files.TrainedRun, output: str, *, shapes: Sequence[Sequence[int]] = (),
           dtype: str = 'float32', platforms: Sequence[str] | None = None,
           source: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes one program per shape (default: the run's evaluation bucket shapes) and
  model.json to `output`; returns model.json's content."""
  config = run.config.copy_and_resolve_references()
  config.model.dtype = dtype
  definition = detectors.build(config, len(run.class_names))
  serve = serving_fn(definition, jax.device_put(run.params), config.eval_top_k)
  os.makedirs(output, exist_ok=True)
  programs = []
  for height, width in (shapes or run.eval_bucket_shapes):
    exported = export_shape(serve, (height, width), platforms)
    name = f'detector_{height}x{width}.jax'
    with open(os.path.join(output, name), 'wb') as f:
      f.write(exported.serialize())
    programs.append({'file': name, 'height': height, 'width': width,
                     'platforms': list(exported.platforms)})
  dataset = config.dataset
  info = {
      'format': 'jax.export', 'jax_version': jax.__version__, 'dtype': dtype,
      'programs': programs, 'top_k': config.eval_top_k,
      'inputs': {'images': 'uint8 [batch, H, W, 3]', 'sizes': 'int32 [batch, 2]',
                 'orig_sizes': 'int32 [batch, 2]'},
      'outputs': {'boxes': 'float32 [batch, top_k, 4] x0, y0, x1, y1 in original pixels',
                  'scores': 'float32 [batch, top_k]', 'labels': 'int32 [batch, top_k]'},
      'preprocess': {
          'resize': 'shorter side to shorter_side, longer side at most max_size (aspect kept, '
                    'sizes rounded), antialiased bilinear (PIL-like); then placed at the top '
                    'left of the smallest program shape that holds it',
          'shorter_side': dataset.eval_scale, 'max_size': dataset.eval_max_size,
          'mean': list(transforms.IMAGENET_MEAN), 'std': list(transforms.IMAGENET_STD)},
      'class_names': list(run.class_names),
      'category_ids': [int(c) for c in run.category_ids],
      'source': source or {},
  }
  with open(os.path.join(output, INFO), 'w') as f:
    json.dump(info, f, indent=1)
  return info
