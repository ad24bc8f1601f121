"""Detections of a model over an evaluation split, data parallel over all devices."""
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils

from qna_detr import parallel
from qna_detr.data import batching
from qna_detr.data.pipeline import DetectionDataset
from qna_detr.detr import postprocess, to_coco_results

META_KEYS = ('image_id', 'valid')


def make_predict_fn(model, top_k: int) -> Callable:
  """(params, batch) -> post-processed detections in original-image COCO coordinates."""
  def predict(params, batch):
    outputs = model.apply({'params': params}, batch['inputs'], batch['padding_mask'], train=False)
    return postprocess(outputs, batch['orig_size'], top_k=top_k)
  return predict


def predict_dataset(predict_fn: Callable, params: Any, dataset: DetectionDataset,
                    mesh: jax.sharding.Mesh, *, log_every: int = 20,
                    on_batch: Optional[Callable[[int, int], None]] = None) -> list[dict]:
  """COCO result dicts for every real example of the split (all processes' shards).

  Logs progress with an ETA every `log_every` batches; filler examples are dropped.
  """
  sharding = parallel.batch_sharding(mesh)
  jitted = jax.jit(predict_fn, out_shardings=parallel.replicated(mesh))
  detections = []
  total = dataset.num_batches
  start = time.time()
  with jax.set_mesh(mesh):
    for index, batch in enumerate(dataset.iterator(fixed_length=jax.process_count() > 1)):
      arrays = batching.to_global_arrays(
          {k: v for k, v in batch.items() if k not in META_KEYS}, sharding)
      result = jax.device_get(jitted(params, arrays))
      meta = {k: batch[k] for k in META_KEYS}
      if jax.process_count() > 1:
        meta = multihost_utils.process_allgather(meta, tiled=True)
      keep = meta['valid']
      detections += to_coco_results({k: v[keep] for k, v in result.items()},
                                    meta['image_id'][keep], dataset.category_ids)
      if on_batch is not None:
        on_batch(index + 1, total)
      if log_every and (index + 1) % log_every == 0:
        elapsed = time.time() - start
        eta = f', ETA {elapsed / (index + 1) * (total - index - 1):.0f}s' if total else ''
        logging.info('eval batch %d/%s (%.1fs%s)', index + 1, total or '?', elapsed, eta)
  return detections
