"""Every image file decoded once, before training reads it.

TensorFlow fails on a bad image in the middle of an input pipeline without naming the file,
and decodes a JPEG with damaged data to grey or garbled rows with only libjpeg's unnamed
warning on stderr. Here each file is decoded with the pipeline's own decoder up front, its
size compared with the annotation file's, and libjpeg's warnings attributed to their file, so
that every problem is reported with the file's name (and can be skipped).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence

import tensorflow as tf

logger = logging.getLogger(__name__)

MISSING = 'missing file'
_JPEG = b'\xff\xd8'
_TRAILERS = {_JPEG: (b'\xff\xd9', 'JPEG'), b'\x89PNG\r\n\x1a\n': (b'IEND', 'PNG')}
_LIBJPEG_WARNING = 'Corrupt JPEG data'


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
  """Collects what native code writes to file descriptor 2 (into the yielded list, on exit);
  lines other than libjpeg's warnings are written back to stderr."""
  text: list[str] = []
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield text
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      sink.seek(0)
      text.append(sink.read().decode(errors='replace'))
      others = [line for line in text[0].splitlines() if _LIBJPEG_WARNING not in line]
      if others:
        os.write(2, ('\n'.join(others) + '\n').encode())


def _decode(path: str) -> tuple[tuple[int, int] | None, str | None]:
  """((height, width), None) of a decodable image, or (None, why not)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    return None, MISSING
  except OSError as e:
    return None, f'unreadable file ({e.strerror})'
  if not data:
    return None, 'empty file'
  for magic, (end, name) in _TRAILERS.items():
    if data.startswith(magic) and end not in data[-64:]:
      return None, f'truncated {name} file (no end marker)'
  try:
    shape = tf.io.decode_image(data, channels=3, expand_animations=False).shape
  except tf.errors.OpError as e:
    message = e.message.split('}}')[-1].split('[Op:')[0].strip()
    return None, f'not a decodable image ({message})'
  return (int(shape[0]), int(shape[1])), None


def _corrupt_jpegs(paths: Sequence[str]) -> dict[str, str]:
  """{path: libjpeg's warning} of the JPEG files among `paths` that decode with one, each
  decoded alone so that its warning is its own."""
  found = {}
  for path in paths:
    with open(path, 'rb') as f:
      if f.read(2) != _JPEG:
        continue
    with _captured_stderr() as text:
      _decode(path)
    warnings = [line for line in text[0].splitlines() if _LIBJPEG_WARNING in line]
    if warnings:
      found[path] = warnings[0].strip()
  return found


def check(paths: Sequence[str], sizes: Sequence[tuple[int, int]] | None = None,
          log_every_s: float = 30.0) -> tuple[list[str | None], list[tuple[int, int] | None]]:
  """(problem or None, decoded (height, width) or None) of every file; with `sizes`, a
  decoded size that differs from the expected one is a problem too."""
  start, last_log = time.time(), time.time()
  results = []
  with _captured_stderr() as text, concurrent.futures.ThreadPoolExecutor(8) as pool:
    for result in pool.map(_decode, paths):
      results.append(result)
      if time.time() - last_log >= log_every_s:
        rate = len(results) / (time.time() - start)
        logger.info('Checked %d/%d images, ETA %.0fs', len(results), len(paths),
                    (len(paths) - len(results)) / rate)
        last_log = time.time()
  corrupt = {}
  if _LIBJPEG_WARNING in text[0]:  # Someone's; find whose.
    corrupt = _corrupt_jpegs([p for p, (_, problem) in zip(paths, results) if problem is None])
  problems, decoded = [], []
  for index, (path, (size, problem)) in enumerate(zip(paths, results)):
    if path in corrupt:
      problem = f'corrupt JPEG data (libjpeg: {corrupt[path]})'
    elif size is not None and sizes is not None and tuple(sizes[index]) != size:
      expected = tuple(sizes[index])
      problem = (f'its size {size[0]} x {size[1]} differs from the annotation file\'s '
                 f'{expected[0]} x {expected[1]}')
    problems.append(problem)
    decoded.append(size if problem is None else None)
  return problems, decoded
