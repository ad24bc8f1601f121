"""QnA-DETR: DETR with a QnA-ViT backbone in JAX/Flax.

`from qna_detr import Detector` loads a trained detector (`qna_detr.inference`).
"""
import os

__version__ = '0.2.0'

# TensorFlow (the input pipeline) prints C++ INFO lines at import; keep them off unless asked.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')


def __getattr__(name: str):
  if name == 'Detector':  # Imported on first use: it pulls in the whole stack.
    from qna_detr.inference import Detector  # pylint: disable=g-import-not-at-top
    return Detector
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
