"""IDEA-Research/DINO checkpoints (`torch.save` of {'model': state_dict, ...}) onto the 'dino'
module's parameters, without torch (`utils.torch_pickle`).

Every tensor of the state dict is accounted for once: mapped onto one parameter, or an alias
of one (the reference shares its box and class heads between all decoder layers and the
decoder, and saves each share under its own name: they must hold the same values), or named
as unknown. A ResNet backbone ('backbone.0.body.*') goes through the torchvision mapping.
Torch's Linear weights [out, in] become Dense kernels [in, out]; convolutions [O, I, kh, kw]
become [kh, kw, I, O]; the decoder's self-attention's packed in_proj splits into query, key
and value [d, heads, d / heads]; norms' weights become scales.

`category_ids` keeps the class rows of those ids (COCO's 91-id head onto a dataset's
contiguous classes).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Callable

from flax import traverse_util
import numpy as np

from qna_detr.backbones import torchvision_weights
from qna_detr.utils import torch_pickle

Tree = dict[str, Any]
_BACKBONE = 'backbone.0.body.'
_LINEAR = {'weight': ('kernel', lambda w: w.T), 'bias': ('bias', lambda b: b)}
_NORM = {'weight': ('scale', lambda w: w), 'bias': ('bias', lambda b: b)}
_CONV = {'weight': ('kernel', lambda w: np.transpose(w, (2, 3, 1, 0))),
         'bias': ('bias', lambda b: b)}
_EMBED = {'weight': ('embedding', lambda w: w)}

# (torch module pattern, flax module path, leaf rule); the groups of the pattern fill the path.
_RULES: list[tuple[str, str, dict]] = [
    (r'transformer\.encoder\.layers\.(\d+)\.self_attn\.(\w+)', 'encoder_{0}/self_attn/{1}',
     _LINEAR),
    (r'transformer\.encoder\.layers\.(\d+)\.norm1', 'encoder_{0}/norm1', _NORM),
    (r'transformer\.encoder\.layers\.(\d+)\.(linear[12])', 'encoder_{0}/ffn/{1}', _LINEAR),
    (r'transformer\.encoder\.layers\.(\d+)\.norm2', 'encoder_{0}/ffn/norm2', _NORM),
    (r'transformer\.decoder\.layers\.(\d+)\.cross_attn\.(\w+)', 'decoder_{0}/cross_attn/{1}',
     _LINEAR),
    (r'transformer\.decoder\.layers\.(\d+)\.(norm[12])', 'decoder_{0}/{1}', _NORM),
    (r'transformer\.decoder\.layers\.(\d+)\.(linear[12])', 'decoder_{0}/ffn/{1}', _LINEAR),
    (r'transformer\.decoder\.layers\.(\d+)\.norm3', 'decoder_{0}/ffn/norm3', _NORM),
    (r'transformer\.decoder\.norm', 'decoder_norm', _NORM),
    (r'transformer\.decoder\.ref_point_head\.layers\.(\d+)', 'ref_point_head/layer_{0}',
     _LINEAR),
    (r'transformer\.enc_output', 'enc_output', _LINEAR),
    (r'transformer\.enc_output_norm', 'enc_output_norm', _NORM),
    (r'transformer\.enc_out_class_embed', 'enc_out_class_embed', _LINEAR),
    (r'transformer\.enc_out_bbox_embed\.layers\.(\d+)', 'enc_out_bbox_embed/layer_{0}',
     _LINEAR),
    (r'(?:transformer\.decoder\.)?bbox_embed\.\d+\.layers\.(\d+)', 'bbox_embed/layer_{0}',
     _LINEAR),
    (r'(?:transformer\.decoder\.)?class_embed\.\d+', 'class_embed', _LINEAR),
    (r'input_proj\.(\d+)\.0', 'input_proj_{0}_conv', _CONV),
    (r'input_proj\.(\d+)\.1', 'input_proj_{0}_norm', _NORM),
    (r'label_enc', 'label_enc', _EMBED),
]
_PARAMETERS = {'transformer.level_embed': 'level_embed',
               'transformer.tgt_embed.weight': 'tgt_embed',
               'transformer.refpoint_embed.weight': 'refpoint_embed'}
_CLASS_LEAVES = ('class_embed/kernel', 'class_embed/bias', 'enc_out_class_embed/kernel',
                 'enc_out_class_embed/bias')


@dataclasses.dataclass
class Report:
  """What became of the state dict's tensors."""
  mapped: list[str] = dataclasses.field(default_factory=list)
  aliases: list[str] = dataclasses.field(default_factory=list)
  unknown: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return (f'{len(self.mapped)} tensors mapped, {len(self.aliases)} aliases of mapped ones, '
            f'{len(self.unknown)} unknown' + (f' ({self.unknown[:5]})' if self.unknown else ''))


def _self_attention(layer: str, leaf: str, value: np.ndarray, heads: int) -> dict[str, Any]:
  """torch MultiheadAttention tensors -> flax MultiHeadDotProductAttention leaves."""
  prefix = f'decoder_{layer}/self_attn'
  if leaf.startswith('out_proj.'):
    d = value.shape[0]
    if leaf.endswith('weight'):
      return {f'{prefix}/out/kernel': value.T.reshape(heads, d // heads, d)}
    return {f'{prefix}/out/bias': value}
  parts = np.split(value, 3, axis=0)
  out = {}
  for name, part in zip(('query', 'key', 'value'), parts):
    d = part.shape[0]
    if leaf == 'in_proj_weight':
      out[f'{prefix}/{name}/kernel'] = part.T.reshape(part.shape[1], heads, d // heads)
    else:
      out[f'{prefix}/{name}/bias'] = part.reshape(heads, d // heads)
  return out


def _rule_for(module: str) -> tuple[str, dict] | None:
  for pattern, target, leaves in _RULES:
    match = re.fullmatch(pattern, module)
    if match:
      return target.format(*match.groups()), leaves
  return None


def _head_leaves(name: str, value: np.ndarray, heads: int) -> dict[str, Any] | None:
  """The flax leaves of one tensor of the head, or None if the name is not the head's."""
  if name in _PARAMETERS:
    return {_PARAMETERS[name]: value}
  attention = re.fullmatch(r'transformer\.decoder\.layers\.(\d+)\.self_attn\.(\S+)', name)
  if attention:
    return _self_attention(attention.group(1), attention.group(2), value, heads)
  module, _, leaf = name.rpartition('.')
  found = _rule_for(module)
  if found is None or leaf not in found[1]:
    return None
  target, leaves = found
  flax_leaf, transform = leaves[leaf]
  return {f'{target}/{flax_leaf}': transform(value)}


def _keep_classes(flat: dict[str, Any], category_ids: Sequence[int]) -> None:
  """Class rows of `category_ids` (and the label embedding's last row, its spare)."""
  ids = np.asarray(category_ids)
  for leaf in _CLASS_LEAVES:
    if leaf in flat:
      flat[leaf] = flat[leaf][..., ids]
  if 'label_enc/embedding' in flat:
    table = flat['label_enc/embedding']
    flat['label_enc/embedding'] = np.concatenate([table[ids], table[-1:]])


def convert(state: dict[str, np.ndarray], num_heads: int,
            category_ids: Sequence[int] | None = None) -> tuple[Tree, Report]:
  """(the 'dino' module's parameter tree, as far as the state dict holds it; the report)."""
  flat, origin, report = {}, {}, Report()
  backbone = {k[len(_BACKBONE):]: v for k, v in state.items() if k.startswith(_BACKBONE)}
  for name, value in state.items():
    if name.startswith(_BACKBONE):
      continue
    leaves = _head_leaves(name, np.asarray(value, np.float32), num_heads)
    if leaves is None:
      report.unknown.append(name)
      continue
    for leaf, array in leaves.items():
      if leaf in flat:
        if not np.array_equal(flat[leaf], array):
          raise ValueError(f'{name} should hold the values of {origin[leaf]} (one shared '
                           'module saved twice), but differs from it')
        report.aliases.append(name)
      else:
        flat[leaf], origin[leaf] = array, name
        report.mapped.append(name)
  report.mapped = list(dict.fromkeys(report.mapped))
  report.aliases = [a for a in dict.fromkeys(report.aliases) if a not in report.mapped]
  if category_ids is not None:
    _keep_classes(flat, category_ids)
  tree = traverse_util.unflatten_dict(flat, sep='/')
  if backbone:
    resnet, left_out = torchvision_weights.to_project(backbone)
    tree['backbone'] = resnet['backbone']
    report.mapped += [_BACKBONE + k for k in backbone if k not in left_out
                      and not k.endswith('num_batches_tracked')]
    report.unknown += [_BACKBONE + k for k in left_out]
  return tree, report


def read(path: str, num_heads: int,
         category_ids: Sequence[int] | None = None) -> tuple[Tree, Report]:
  """`convert` of the checkpoint at `path` (its 'model' entry, or a bare state dict)."""
  return convert(torch_pickle.read_state_dict(path, 'model'), num_heads, category_ids)
