"""Pretrained QnA-ViT weights for a detector's backbone, with a report of what matched.

Two sources:
- this project's checkpoints (an orbax step directory, e.g. WORKDIR/checkpoints/1000, of a
  QnA-ViT classifier or of a detector): the parameters under 'backbone';
- the authors' released ImageNet checkpoints (flax msgpack files of the parameter tree of
  models/qna_vit.py in github.com/moabarar/qna), whose module names are mapped onto this
  project's (`authors_to_project`).
"""
import dataclasses
import os
import re
from typing import Any, Callable, Optional

from absl import logging
from flax import serialization
from flax import traverse_util
import numpy as np
import orbax.checkpoint as ocp

Tree = dict[str, Any]
FORMATS = ('auto', 'qna_detr', 'authors')

# The authors' block-level modules -> ours. Their BaseBlock creates its modules in the order
# skip conv, mixer, first LayerNorm, MLP, second LayerNorm.
_BLOCK_RULES = [
    (r'LayerNorm_0/(.*)', r'norm1/\1'),
    (r'LayerNorm_1/(.*)', r'norm2/\1'),
    (r'MlpBlock_0/Dense_0/(.*)', r'mlp/fc1/\1'),
    (r'MlpBlock_0/Dense_1/(.*)', r'mlp/fc2/\1'),
    (r'Conv_0/(.*)', r'skip/\1'),
    (r'FusedKQnA_0/(.*)', r'mixer/\1'),
    (r'MultiHeadSelfAttention_0/RelativePositionalEmbedding_0/(.*)', r'mixer/\1'),
    (r'MultiHeadSelfAttention_0/(.*)', r'mixer/\1'),
]
_STAGE_RULES = [
    (r'QnAStage_(\d+)/QnA_Block_(\d+)_stride_2/(.*)', lambda m: f'stage{int(m[1]) + 1}_down'),
    (r'QnAStage_(\d+)/QnA_Block_(\d+)/(.*)', lambda m: f'stage{int(m[1]) + 1}_qna{m[2]}'),
    (r'LSAStage_(\d+)/MSA_Block_(\d+)/(.*)', lambda m: f'stage{int(m[1]) + 1}_sa{m[2]}'),
]


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


def _authors_name(path: str) -> Optional[str]:
  """One flattened authors' backbone parameter path -> ours (None: not a backbone weight)."""
  if path.startswith('StemBlock_0/conv_1x1/'):
    return 'stem/' + path.rsplit('/', 1)[1]
  for pattern, block_name in _STAGE_RULES:
    match = re.fullmatch(pattern, path)
    if match:
      inner = match[3]
      for rule, replacement in _BLOCK_RULES:
        if re.fullmatch(rule, inner):
          return f'{block_name(match)}/{re.sub(rule, replacement, inner)}'
  return None


def authors_to_project(params: Tree) -> tuple[Tree, list[str]]:
  """The authors' QnA-ViT params -> this project's backbone tree, and the paths left out.

  QnA's bias and scale weights are stored there as [k*k, L*h] and [1, 1, k*k, L*h]; here both
  are [k, k, L, h] (same element order).
  """
  flat = traverse_util.flatten_dict(params, sep='/')
  mapped, left_out = {}, []
  for path, value in flat.items():
    name = _authors_name(path)
    if name is None:
      left_out.append(path)
      continue
    mapped[name] = value
  return traverse_util.unflatten_dict(mapped, sep='/'), sorted(left_out)


def _reshape_like(value: np.ndarray, target_shape: tuple[int, ...], name: str) -> np.ndarray:
  value = np.asarray(value)
  if value.shape == tuple(target_shape):
    return value
  if value.size == int(np.prod(target_shape)) and name.endswith(
      ('rpe_bias', 'attn_scale_weights')) and '/mixer/' in f'/{name}':
    return value.reshape(target_shape)
  raise ValueError(f'Pretrained parameter {name!r} has shape {value.shape}, but the model '
                   f'expects {tuple(target_shape)}: is the checkpoint of another variant?')


def read_checkpoint(path: str) -> Tree:
  """The raw parameter tree stored at `path` (orbax step directory or flax msgpack file)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No pretrained checkpoint at {path} (config.pretrained.path).')
  if os.path.isdir(path):
    step_dir = os.path.abspath(path)
    manager = ocp.CheckpointManager(os.path.dirname(step_dir))
    try:
      tree = manager.restore(int(os.path.basename(step_dir)))
    finally:
      manager.close()
  else:
    with open(path, 'rb') as f:
      tree = serialization.msgpack_restore(f.read())
  return tree.get('ema_params') or tree.get('params', tree)  # A training run's average first.


def backbone_params_from(tree: Tree, fmt: str) -> tuple[Tree, list[str]]:
  """The backbone part of a checkpoint's params, in this project's names."""
  if fmt not in FORMATS:
    raise ValueError(f'config.pretrained.format must be one of {FORMATS}, got {fmt!r}.')
  if fmt == 'auto':
    fmt = 'authors' if 'StemBlock_0' in tree else 'qna_detr'
  if fmt == 'authors':
    return authors_to_project(tree)
  if 'backbone' not in tree:
    raise ValueError("A qna_detr checkpoint must hold its backbone under 'backbone'; found "
                     f'{sorted(tree)[:10]}.')
  others = [k for k in tree if k != 'backbone']
  return tree['backbone'], others


def merge_into(backbone: Tree, pretrained: Tree,
               log: Callable[[str], None] = logging.info) -> tuple[Tree, LoadReport]:
  """`backbone` with every parameter that `pretrained` provides replaced."""
  target = traverse_util.flatten_dict(backbone, sep='/')
  source = traverse_util.flatten_dict(pretrained, sep='/')
  merged, matched = dict(target), []
  for name, value in source.items():
    if name in target:
      merged[name] = _reshape_like(value, target[name].shape, name).astype(target[name].dtype)
      matched.append(name)
  report = LoadReport(matched=sorted(matched), missing=sorted(set(target) - set(source)),
                      unexpected=sorted(set(source) - set(target)))
  log(f'Pretrained backbone: {report.summary()}')
  return traverse_util.unflatten_dict(merged, sep='/'), report


def load_backbone(params: Tree, path: str, fmt: str = 'auto') -> tuple[Tree, LoadReport]:
  """Detector params with their 'backbone' replaced from the checkpoint at `path`."""
  pretrained, left_out = backbone_params_from(read_checkpoint(path), fmt)
  if left_out:
    logging.info('Pretrained checkpoint entries outside the backbone, ignored: %s', left_out)
  backbone, report = merge_into(params['backbone'], pretrained)
  return {**params, 'backbone': backbone}, report
