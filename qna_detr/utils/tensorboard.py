"""TensorBoard event files that every reader sees as scalars, images and text.

CLU's default writer stores scalars as TF2 tensor summaries, which TensorBoard's UI converts
but `EventAccumulator.Scalars` (and other tools reading event files) does not find. This
writer stores classic `Summary.Value(simple_value=...)` scalars, PNG image summaries and
text-plugin summaries with TensorBoard's own event-file writer (no TensorFlow needed).
"""
from __future__ import annotations

import io
import math
import time
from collections.abc import Mapping
from typing import Any

from clu import metric_writers
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _png(image: np.ndarray) -> summary_pb2.Summary.Image:
  """[H, W, 3] uint8 (or float in [0, 1]) -> an encoded image summary."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1],
                                   colorspace=image.shape[2] if image.ndim == 3 else 1,
                                   encoded_image_string=buffer.getvalue())


def _text(text: str) -> tuple[tensor_pb2.TensorProto, summary_pb2.SummaryMetadata]:
  tensor = tensor_pb2.TensorProto(dtype=7,  # DT_STRING
                                  string_val=[text.encode()],
                                  tensor_shape=tensor_shape_pb2.TensorShapeProto())
  return tensor, text_metadata.create_summary_metadata(display_name=None, description=None)


class EventWriter(metric_writers.MetricWriter):
  """A CLU metric writer of classic TensorBoard summaries in `logdir`. Non-finite scalars
  are skipped (a metric that does not exist for the data is not a point on a curve). The
  event file is made at the first summary, so that a run refused at its start leaves the
  workdir as it was."""

  def __init__(self, logdir: str):
    self._logdir = logdir
    self._writer: EventFileWriter | None = None

  def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if values:
      if self._writer is None:
        self._writer = EventFileWriter(self._logdir)
      self._writer.add_event(event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                     for tag, value in scalars.items() if math.isfinite(float(value))])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      for i, image in enumerate(batch if batch.ndim == 4 else batch[None]):
        values.append(summary_pb2.Summary.Value(tag=f'{tag}/{i}' if batch.ndim == 4 else tag,
                                                image=_png(image)))
    self._add(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    values = []
    for tag, text in texts.items():
      tensor, metadata = _text(text)
      values.append(summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata))
    self._add(step, values)

  # The project logs no other kinds of summaries; these write nothing.
  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def write_hparams(self, hparams) -> None:
    del hparams

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def create(logdir: str, is_main_process: bool) -> metric_writers.MetricWriter:
  """The project's writer: event files on the main process, nothing elsewhere."""
  if is_main_process:
    return EventWriter(logdir)
  return metric_writers.MultiWriter([])
