"""Pretrained backbone weights: the formats a backbone reads, and a report of what matched.

Formats (`config.pretrained.format`; each backbone's registry entry lists the ones it reads):
  'qna_detr'     this project's checkpoints: an orbax step directory (or a directory of them:
                 the newest) of a detector or a classifier; its moving average when the run
                 kept one;
  'authors'      the QnA-ViT authors' released ImageNet checkpoints, a `checkpoint_<N>` file
                 or the directory holding them (`authors_weights`);
  'torchvision'  torchvision ResNet state dicts, `.pth` files read without torch
                 (`torchvision_weights`).
'auto' tells them apart by what is at the path. Every reader gives the classifier's tree in
this project's names ('backbone', and the classifier's 'norm' and 'head' where the checkpoint
has them); a detector takes its 'backbone'.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from typing import Any, Callable

from flax import traverse_util
import numpy as np

from qna_detr.backbones import authors_weights
from qna_detr.backbones import registry
from qna_detr.backbones import torchvision_weights
from qna_detr.utils import checkpoint_io

logger = logging.getLogger(__name__)

Tree = dict[str, Any]
FORMATS = ('auto', 'qna_detr', 'authors', 'torchvision')


@dataclasses.dataclass
class LoadReport:
  matched: list[str]
  missing: list[str]  # In the model, not in the checkpoint: left at their initialization.
  unexpected: list[str]  # In the checkpoint, not in the model: ignored.

  def summary(self) -> str:
    def some(names):
      return ', '.join(names[:8]) + (' ...' if len(names) > 8 else '')
    return (f'{len(self.matched)} matched, {len(self.missing)} missing '
            f'[{some(self.missing)}], {len(self.unexpected)} unexpected '
            f'[{some(self.unexpected)}]')


def _read_own(path: str) -> tuple[Tree, list[str]]:
  """A checkpoint of this project: its parameters (the average first), all kept."""
  tree = checkpoint_io.read_tree(checkpoint_io.resolve_step_dir(path))
  params = tree.get('ema_params') or tree.get('params', tree)
  if 'backbone' not in params:
    raise ValueError(f"The checkpoint {path} holds no parameters under 'backbone' (found "
                     f'{sorted(params)[:10]}): not a detector or classifier of this project')
  return params, []


_READERS: dict[str, Callable[[str], tuple[Tree, list[str]]]] = {
    'qna_detr': _read_own,
    'authors': authors_weights.read,
    'torchvision': torchvision_weights.read,
}


def detect_format(path: str) -> str:
  """'qna_detr', 'authors' or 'torchvision', from what is at `path`."""
  if os.path.isdir(path):
    return 'authors' if authors_weights.is_checkpoint_dir(path) else 'qna_detr'
  return 'torchvision' if zipfile.is_zipfile(path) else 'authors'


def read(path: str, fmt: str = 'auto', backbone: str | None = None) -> tuple[Tree, list[str]]:
  """(classifier tree in this project's names, source entries left out) of the checkpoint at
  `path`; `backbone` (a registry name) must list the format among those it reads."""
  if fmt not in FORMATS:
    raise ValueError(f'config.pretrained.format must be one of {FORMATS}, got {fmt!r}.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No pretrained checkpoint at {path} (config.pretrained.path).')
  fmt = detect_format(path) if fmt == 'auto' else fmt
  if backbone is not None and fmt not in registry.get(backbone).weight_formats:
    raise ValueError(f'{path} is a {fmt!r} checkpoint; the backbone {backbone!r} reads '
                     f'{registry.get(backbone).weight_formats} (config.pretrained.format)')
  return _READERS[fmt](path)


def _reshape_like(value: np.ndarray, target_shape: tuple[int, ...], name: str) -> np.ndarray:
  value = np.asarray(value)
  if value.shape == tuple(target_shape):
    return value
  if value.size == int(np.prod(target_shape)) and name.endswith(
      ('rpe_bias', 'attn_scale_weights')) and '/mixer/' in f'/{name}':
    return value.reshape(target_shape)
  raise ValueError(f'Pretrained parameter {name!r} has shape {value.shape}, but the model '
                   f'expects {tuple(target_shape)}: is the checkpoint of another variant?')


def merge_into(target: Tree, source: Tree,
               log: Callable[[str], None] = logger.info) -> tuple[Tree, LoadReport]:
  """`target` with every parameter that `source` provides replaced."""
  flat_target = traverse_util.flatten_dict(target, sep='/')
  flat_source = traverse_util.flatten_dict(source, sep='/')
  merged, matched = dict(flat_target), []
  for name, value in flat_source.items():
    if name in flat_target:
      wanted = flat_target[name]
      merged[name] = _reshape_like(value, wanted.shape, name).astype(wanted.dtype)
      matched.append(name)
  report = LoadReport(matched=sorted(matched),
                      missing=sorted(set(flat_target) - set(flat_source)),
                      unexpected=sorted(set(flat_source) - set(flat_target)))
  log(f'Pretrained weights: {report.summary()}')
  return traverse_util.unflatten_dict(merged, sep='/'), report


def load_backbone(params: Tree, path: str, fmt: str = 'auto',
                  backbone: str | None = None) -> tuple[Tree, LoadReport]:
  """Detector (or classifier) params with their 'backbone' replaced from `path`."""
  tree, left_out = read(path, fmt, backbone)
  others = [k for k in tree if k != 'backbone']
  if left_out or others:
    logger.info('Pretrained checkpoint entries outside the backbone, not loaded: %s',
                 sorted(left_out + others)[:20])
  loaded, report = merge_into(params['backbone'], tree['backbone'])
  return {**params, 'backbone': loaded}, report


def load_pretrained_backbone(params: Tree, config: Any) -> Tree:
  """`load_backbone` from `config.pretrained` (path, format) for `config.model.backbone`:
  weights that leave backbone tensors missing or unexpected (another variant's) are refused,
  naming the counts and a few names, unless `config.pretrained.allow_partial`."""
  pretrained = config.pretrained
  loaded, report = load_backbone(params, pretrained.path, pretrained.format,
                                 config.model.backbone)
  if report.missing or report.unexpected:
    if not pretrained.get('allow_partial', False):
      raise ValueError(f'config.pretrained.path={pretrained.path} does not fit the backbone '
                       f'config.model.backbone={config.model.backbone!r}: {report.summary()}; '
                       'is it another variant? (config.pretrained.allow_partial=True loads '
                       'what fits.)')
    logger.warning('Partial pretrained load (config.pretrained.allow_partial): %s; the '
                   'missing tensors keep their initialization', report.summary())
  return loaded


def load_classifier(params: Tree, path: str, fmt: str = 'auto',
                    backbone: str | None = None) -> tuple[Tree, LoadReport]:
  """A classifier's params (backbone, norm and head) replaced from `path`."""
  tree, left_out = read(path, fmt, backbone)
  if left_out:
    logger.info('Pretrained checkpoint entries not loaded: %s', left_out[:20])
  return merge_into(params, tree)
