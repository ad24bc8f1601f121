"""The QnA-ViT authors' released ImageNet checkpoints, mapped onto this project's names.

Their checkpoints (github.com/moabarar/qna, `checkpoint_<N>` files) are flax msgpack files of
the parameter tree of their models/qna_vit.py. QnA's relative position bias and attention
scale weights are stored there as [k*k, L*h] and [1, 1, k*k, L*h]; here both are [k, k, L, h]
(same element order), reshaped when merged (`weights.merge_into`).
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

from flax import serialization
from flax import traverse_util

Tree = dict[str, Any]

# Their block-level modules -> ours. Their BaseBlock creates its modules in the order skip
# conv, mixer, first LayerNorm, MLP, second LayerNorm.
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
# Their 'gap' classification head -> the classifier's (`QnAViTClassifier`).
_HEAD_RULES = [
    (r'ClassificationHead_0/LayerNorm_0/(.*)', r'norm/\1'),
    (r'ClassificationHead_0/head_logits/(.*)', r'head/\1'),
]
_CHECKPOINT_FILE = re.compile(r'checkpoint_(\d+)')


def _project_name(path: str) -> Optional[str]:
  """One flattened parameter path of theirs -> ours in the classifier's tree (None: unknown)."""
  if path.startswith('StemBlock_0/conv_1x1/'):
    return 'backbone/stem/' + path.rsplit('/', 1)[1]
  for rule, replacement in _HEAD_RULES:
    if re.fullmatch(rule, path):
      return re.sub(rule, replacement, path)
  for pattern, block_name in _STAGE_RULES:
    match = re.fullmatch(pattern, path)
    if match:
      inner = match[3]
      for rule, replacement in _BLOCK_RULES:
        if re.fullmatch(rule, inner):
          return f'backbone/{block_name(match)}/{re.sub(rule, replacement, inner)}'
  return None


def to_project(params: Tree) -> tuple[Tree, list[str]]:
  """Their QnA-ViT classifier params -> this project's classifier tree ('backbone', 'norm',
  'head'), and the paths left out."""
  mapped, left_out = {}, []
  for path, value in traverse_util.flatten_dict(params, sep='/').items():
    name = _project_name(path)
    if name is None:
      left_out.append(path)
    else:
      mapped[name] = value
  return traverse_util.unflatten_dict(mapped, sep='/'), sorted(left_out)


def checkpoint_file(path: str) -> str:
  """`path`, or the newest `checkpoint_<N>` file of the directory `path` (their README
  passes the model's directory)."""
  if not os.path.isdir(path):
    return path
  steps = {int(m[1]): name for name in os.listdir(path) if (m := _CHECKPOINT_FILE.fullmatch(name))}
  if not steps:
    raise FileNotFoundError(f'{path} holds no checkpoint_<N> file of the authors\' release')
  return os.path.join(path, steps[max(steps)])


def is_checkpoint_dir(path: str) -> bool:
  return os.path.isdir(path) and any(_CHECKPOINT_FILE.fullmatch(n) for n in os.listdir(path))


def read(path: str) -> tuple[Tree, list[str]]:
  """(this project's classifier tree, their paths left out) of a released checkpoint."""
  with open(checkpoint_file(path), 'rb') as f:
    tree = serialization.msgpack_restore(f.read())
  return to_project(tree.get('params', tree))
