"""torchvision ResNet weights (a `.pth` state dict) for `resnet.ResNet`, read without torch
(`utils.torch_pickle`).

Name mapping: 'layer2.0.conv1.weight' -> backbone/layer2_0/conv1/kernel ([O, I, kh, kw] ->
[kh, kw, I, O]), 'downsample.0' / 'downsample.1' -> 'downsample_conv' / 'downsample_bn', each
batch norm's weight, bias, running_mean and running_var folded into scale and bias, and
'fc.weight' / 'fc.bias' -> head/kernel (transposed) / head/bias.
"""
import collections
import re
from typing import Any

from flax import traverse_util
import numpy as np

from qna_detr.backbones import resnet
from qna_detr.utils import torch_pickle

Tree = dict[str, Any]
_BN_STATS = ('weight', 'bias', 'running_mean', 'running_var')


def _module_name(torch_module: str) -> str:
  """'layer2.0.downsample.1' -> 'backbone/layer2_0/downsample_bn'; 'fc' -> 'head'."""
  if torch_module == 'fc':
    return 'head'
  name = re.sub(r'^layer(\d+)\.(\d+)\.', r'layer\1_\2/', torch_module)
  name = name.replace('downsample.0', 'downsample_conv').replace('downsample.1', 'downsample_bn')
  return f'backbone/{name}'


def to_project(state: dict[str, np.ndarray]) -> tuple[Tree, list[str]]:
  """A torchvision ResNet state dict -> a `resnet.ResNetClassifier` parameter tree, and the
  state dict's names left out (unknown, or a batch norm lacking some of its statistics).

  Batch-norm step counters (num_batches_tracked) are dropped silently.
  """
  flat, left_out = {}, []
  norms = collections.defaultdict(dict)
  for name, value in state.items():
    module, _, leaf = name.rpartition('.')
    if leaf == 'num_batches_tracked':
      continue
    target = _module_name(module)
    if target.rsplit('/', 1)[-1].startswith(('bn', 'downsample_bn')) and leaf in _BN_STATS:
      norms[target][leaf] = name
    elif leaf == 'weight' and value.ndim == 4:
      flat[f'{target}/kernel'] = np.transpose(value, (2, 3, 1, 0))
    elif target == 'head' and leaf in ('weight', 'bias'):
      flat[f'head/{"kernel" if leaf == "weight" else "bias"}'] = value.T
    else:
      left_out.append(name)
  for target, names in norms.items():
    if len(names) < len(_BN_STATS):
      left_out.extend(names.values())
      continue
    stats = [np.asarray(state[names[k]], np.float64) for k in _BN_STATS]
    scale, bias = resnet.fold_batch_norm(*stats)
    flat[f'{target}/scale'] = scale.astype(np.float32)
    flat[f'{target}/bias'] = bias.astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep='/'), sorted(left_out)


def read(path: str) -> tuple[Tree, list[str]]:
  """(`resnet.ResNetClassifier` tree, state-dict names left out) of the `.pth` at `path`."""
  return to_project(torch_pickle.read_state_dict(path))
