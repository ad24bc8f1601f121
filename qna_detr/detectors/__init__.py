"""Detectors: the seam (`DetectorDef`) and the registry of builders (`build`, `register`).

Importing the package registers the built-in detectors ('detr', 'dino').
"""
from qna_detr.detectors.base import DetectorDef, select_levels
from qna_detr.detectors.registry import build, check, names, register
from qna_detr.detectors.detr import builder as _detr  # noqa: F401  (registers 'detr')
from qna_detr.detectors.dino import builder as _dino  # noqa: F401  (registers 'dino')

__all__ = ['DetectorDef', 'build', 'check', 'names', 'register', 'select_levels']
