"""A detector's detections over an evaluation split, data parallel over all devices, and their
COCO evaluation."""
import logging
import time
from typing import Any, Callable, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np

from qna_detr import parallel
from qna_detr.data import batching
from qna_detr.data.pipeline import DetectionDataset
from qna_detr.detectors import DetectorDef
from qna_detr.evaluation import coco_eval

logger = logging.getLogger(__name__)

META_KEYS = ('image_id', 'valid')
INPUT_KEYS = ('inputs', 'padding_mask', 'orig_size')


def predict_dataset(detector: DetectorDef, params: Any, dataset: DetectionDataset,
                    mesh: jax.sharding.Mesh, top_k: int, *, log_every: int = 20,
                    on_batch: Optional[Callable[[int, int], None]] = None) -> list[dict]:
  """COCO result dicts for every real example of the split (all processes' shards).

  Logs progress with an ETA every `log_every` batches; filler examples are dropped.
  """
  sharding = parallel.batch_sharding(mesh)
  jitted = jax.jit(lambda p, b: detector.predict(p, b['inputs'], b['padding_mask'],
                                                 b['orig_size'], top_k),
                   out_shardings=parallel.replicated(mesh))
  detections = []
  total = dataset.num_batches
  start = time.time()
  with jax.set_mesh(mesh):
    for index, batch in enumerate(dataset.iterator(fixed_length=jax.process_count() > 1)):
      arrays = batching.to_global_arrays({k: batch[k] for k in INPUT_KEYS}, sharding)
      result = jax.device_get(jitted(params, arrays))
      _check_finite(result, batch['image_id'][batch['valid']])
      meta = {k: batch[k] for k in META_KEYS}
      if jax.process_count() > 1:
        meta = multihost_utils.process_allgather(meta, tiled=True)
      keep = meta['valid']
      detections += coco_eval.to_coco_results({k: v[keep] for k, v in result.items()},
                                              meta['image_id'][keep], dataset.category_ids)
      if on_batch is not None:
        on_batch(index + 1, total)
      if log_every and (index + 1) % log_every == 0:
        elapsed = time.time() - start
        eta = f', ETA {elapsed / (index + 1) * (total - index - 1):.0f}s' if total else ''
        logger.info('eval batch %d/%s (%.1fs%s)', index + 1, total or '?', elapsed, eta)
  return detections


def _check_finite(result: dict[str, Any], image_ids) -> None:
  """Non-finite scores or boxes (a diverged model) would reach pycocotools as detections."""
  bad = [k for k in ('scores', 'boxes') if not np.isfinite(result[k]).all()]
  if bad:
    raise FloatingPointError(f'The detector predicts non-finite {" and ".join(bad)} (images '
                             f'{list(image_ids)[:5]}): are its parameters finite?')


def evaluate(detector: DetectorDef, params: Any, dataset: DetectionDataset,
             mesh: jax.sharding.Mesh, top_k: int) -> tuple[dict, dict, str, list]:
  """(metrics, AP per category, pycocotools' summary, detections) of the split."""
  detections = predict_dataset(detector, params, dataset, mesh, top_k)
  metrics, per_category, summary = coco_eval.evaluate(dataset.coco_ground_truth(), detections)
  return metrics, per_category, summary, detections
