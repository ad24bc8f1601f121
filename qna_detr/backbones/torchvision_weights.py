"""torchvision ResNet weights (a `.pth` state dict) for `resnet.ResNet`, read without torch.

`torch.save` writes a zip archive: `<name>/data.pkl`, a pickle of the state dict whose tensors
are rebuilt by `torch._utils._rebuild_tensor_v2` from storages named by persistent ids, and
`<name>/data/<key>`, each storage's raw bytes. The unpickler below rebuilds numpy arrays and
resolves nothing else, so a file cannot make it import or call arbitrary code.

Name mapping: 'layer2.0.conv1.weight' -> backbone/layer2_0/conv1/kernel ([O, I, kh, kw] ->
[kh, kw, I, O]), 'downsample.0' / 'downsample.1' -> 'downsample_conv' / 'downsample_bn', each
batch norm's weight, bias, running_mean and running_var folded into scale and bias, and
'fc.weight' / 'fc.bias' -> head/kernel (transposed) / head/bias.
"""
import collections
import pickle
import re
import zipfile
from typing import Any, Callable

from flax import traverse_util
import ml_dtypes
import numpy as np

from qna_detr.backbones import resnet

Tree = dict[str, Any]

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
_BN_STATS = ('weight', 'bias', 'running_mean', 'running_var')


class _StorageType:
  """Stands for a torch storage class (e.g. torch.FloatStorage) inside the pickle."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name]).newbyteorder('<')


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2: a strided view of a flat storage, as a new array."""
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= storage.size or min(stride, default=0) < 0:
    raise pickle.UnpicklingError(f'A tensor of size {tuple(size)}, stride {tuple(stride)} and '
                                 f'offset {offset} overruns its storage of {storage.size}.')
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)


class _Unpickler(pickle.Unpickler):
  """Unpickles a torch state dict into numpy arrays."""

  def __init__(self, file, read_storage: Callable[[str, np.dtype, int], np.ndarray]):
    super().__init__(file)
    self._read_storage = read_storage

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f'{module}.{name} is not part of a tensor state dict.')

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f'Unsupported persistent id {pid!r}.')
    _, storage_type, key, _, numel = pid
    return self._read_storage(key, storage_type.dtype, numel)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a state dict saved by `torch.save` (zip format), as numpy arrays."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path} is not a zip archive: only the format of torch.save since '
                     'torch 1.6 is read.')
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise ValueError(f'{path} holds {len(pickles)} data.pkl files, not one.')
    root = pickles[0][:-len('data.pkl')]
    if f'{root}byteorder' in archive.namelist() and (
        archive.read(f'{root}byteorder') != b'little'):
      raise ValueError(f'{path} was saved on a big-endian machine; only little-endian is read.')
    storages = {}

    def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      if key not in storages:
        storages[key] = np.frombuffer(archive.read(f'{root}data/{key}'), dtype, count=numel)
      return storages[key]

    with archive.open(pickles[0]) as f:
      return dict(_Unpickler(f, read_storage).load())


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
  return to_project(read_state_dict(path))
