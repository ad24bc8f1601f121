"""Files written by `torch.save`, read without torch.

`torch.save` writes a zip archive: `<name>/data.pkl`, a pickle of the saved object (a state
dict, or a checkpoint dict holding one) whose tensors are rebuilt by
`torch._utils._rebuild_tensor_v2` from storages named by persistent ids, and
`<name>/data/<key>`, each storage's raw bytes. The unpickler below rebuilds tensors as numpy
arrays and containers as themselves; any other class becomes an inert `Opaque` record. It
resolves nothing else, so a file cannot make it import or call arbitrary code.
"""
import collections
import functools
import pickle
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class Opaque:
  """What a class other than a tensor's or a container's unpickles to: its name and
  arguments, nothing run (e.g. the argparse.Namespace of a checkpoint's 'args')."""

  def __init__(self, name: str, *args, **kwargs):
    self.name, self.args, self.kwargs, self.state = name, args, kwargs, None

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def __repr__(self) -> str:
    return f'Opaque({self.name})'


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
    return functools.partial(Opaque, f'{module}.{name}')

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f'Unsupported persistent id {pid!r}.')
    _, storage_type, key, _, numel = pid
    return self._read_storage(key, storage_type.dtype, numel)


def load(path: str) -> Any:
  """The object saved by `torch.save` (zip format) at `path`, its tensors as numpy arrays."""
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
      return _Unpickler(f, read_storage).load()


def read_state_dict(path: str, key: str | None = None) -> dict[str, np.ndarray]:
  """The tensors of a state dict saved by `torch.save`: the saved object itself, or, where it
  is a checkpoint dict with an entry `key` (e.g. 'model'), that entry; checked to map names to
  arrays."""
  saved = load(path)
  if key is not None and isinstance(saved, dict) and isinstance(saved.get(key), dict):
    saved = saved[key]
  if not isinstance(saved, dict) or not all(isinstance(v, np.ndarray) for v in saved.values()):
    keys = sorted(map(str, saved))[:8] if isinstance(saved, dict) else type(saved).__name__
    under = f' nor holds one under {key!r}' if key else ''
    raise ValueError(f'{path} is not a state dict (names to tensors){under}: it holds {keys}.')
  return dict(saved)
