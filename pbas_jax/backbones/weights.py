"""Backbone weights: torch state dicts -> Flax variables, and the converted files, read without torch.

One backbone's variables are one safetensors file, keys '/'-joined Flax paths
('params/layer2_0/conv1/kernel', 'batch_stats/bn1/mean'), float32, beside a json sidecar holding
where the values came from and the file's sha256:

    <cache_dir>/<backbone>-<weights>.safetensors        e.g. wide_resnet50_2-IMAGENET1K_V1
    <cache_dir>/<backbone>-<weights>.json
    <cache_dir>/<backbone>-random-seed<N>.safetensors   (`--weights random --seed N`)
    <cache_dir>/<backbone>-src-<sha>.safetensors        a source file converted on first use

A source file is a `.safetensors` state dict with torch key names (torchvision's, or timm's:
timm publishes its ResNets with torchvision's names), given by path or as `hf-hub:<repo>`; `<sha>`
starts its sha256, so a changed source is converted again. `from_torch` is the one conversion
of every backbone: the Flax module's own variable paths give the torch names to look for.

Files are written to a temporary name and renamed, the sidecar first, so a crash never leaves a
weights file that passes its check with the wrong content.
"""
import functools
import hashlib
import json
import os
import pathlib
import re
import shlex
from typing import Any, Mapping, Sequence

import flax.traverse_util
import numpy as np
import safetensors
import safetensors.numpy

from pbas_jax import fileio

FORMAT = 1
HUB_PREFIX = "hf-hub:"


class WeightsNotFoundError(FileNotFoundError):
  """No weights file; the message names the file and the command that makes it."""


class CorruptWeightsError(ValueError):
  """A weights file that cannot be used as it is; the message says how to remake it."""


class IncompatibleWeightsError(ValueError):
  """A state dict whose keys or shapes are not the backbone's; the message lists a few."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """`cache_dir`, else $PBAS_JAX_CACHE, else ~/.cache/pbas_jax ("" counts as unset)."""
  root = fileio.cache_dir(cache_dir)
  return pathlib.Path(root).expanduser()


def is_source(weights: str) -> bool:
  """Whether `weights` names a source file (a `.safetensors` path or an `hf-hub:` id)."""
  return weights.startswith(HUB_PREFIX) or weights.endswith(".safetensors")


def weights_path(name: str, weights: str, *, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where the converted variables of backbone `name` with weight id `weights` live."""
  if not re.fullmatch(r"[A-Za-z0-9_.]+", weights) or weights == "DEFAULT":
    raise ValueError(f"Backbone weights {weights!r} (config backbone.weights): give a concrete "
                     "weight id such as IMAGENET1K_V1, 'random', a .safetensors file or "
                     f"{HUB_PREFIX}<repo>.")
  stem = f"{name}-random-seed{seed}" if weights == "random" else f"{name}-{weights}"
  return cache_root(cache_dir) / f"{stem}.safetensors"


def source_weights_path(name: str, source_sha256: str,
                        cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where the variables converted from a source file with that sha256 live."""
  return cache_root(cache_dir) / f"{name}-src-{source_sha256[:16]}.safetensors"


def sidecar_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_suffix(".json")


def convert_command(name: str, weights: str, seed: int = 0,
                    cache_dir: str | os.PathLike | None = None) -> str:
  """The shell command that writes `weights_path(name, weights, ...)`."""
  args = ["python", "-m", "pbas_jax.convert", "--arch", name, "--weights", weights]
  if weights == "random":
    args += ["--seed", str(seed)]
  if cache_dir:
    args += ["--cache_dir", str(cache_dir)]
  return shlex.join(args)


def source_file(weights: str) -> pathlib.Path:
  """The local file a source names: the path itself, or an `hf-hub:<repo>` id's model.safetensors.

  Hub ids are fetched with `huggingface_hub` (the `hub` extra), which keeps them in its cache and
  reads only that cache when HF_HUB_OFFLINE=1.

  Raises:
    WeightsNotFoundError: the file does not exist, or the hub id cannot be fetched or found in
      the hub cache (the message says what to do).
  """
  if weights.startswith(HUB_PREFIX):
    repo = weights.removeprefix(HUB_PREFIX)
    manual = (f"or download https://huggingface.co/{repo}/resolve/main/model.safetensors and "
              "give its path as backbone.weights")
    try:
      import huggingface_hub  # pylint: disable=g-import-not-at-top  (hub extra only)
    except ImportError as e:
      raise WeightsNotFoundError(
          f"Backbone weights {weights!r} (config backbone.weights): hub ids need huggingface_hub "
          f"({e}). Run\n  pip install 'pbas_jax[hub]'\n{manual}.") from e
    try:
      return pathlib.Path(huggingface_hub.hf_hub_download(repo, "model.safetensors"))
    except (OSError, ValueError, huggingface_hub.errors.EntryNotFoundError) as e:
      raise WeightsNotFoundError(
          f"Backbone weights {weights!r} (config backbone.weights): model.safetensors of {repo} "
          f"is neither in the Hugging Face hub cache nor downloadable ({type(e).__name__}: {e}). "
          f"Check the id; offline (HF_HUB_OFFLINE=1), fetch it once where there is internet "
          f"(hf download {repo} model.safetensors), {manual}.") from e
  path = pathlib.Path(weights).expanduser()
  if not path.is_file():
    raise WeightsNotFoundError(
        f"Backbone weights file {path} (config backbone.weights) does not exist. Give the path of a "
        ".safetensors state dict with torchvision or timm key names (WideResNet50 on ImageNet: "
        "model.safetensors of https://huggingface.co/timm/wide_resnet50_2.tv_in1k), an "
        f"{HUB_PREFIX}<repo> id, or a weight id.")
  return path


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # part of the cache key: a rewritten file is hashed again
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def file_sha256(path: pathlib.Path) -> str:
  """sha256 of a file's content (remembered per process while its size and mtime stay)."""
  stat = path.stat()
  return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def read_state(path: pathlib.Path) -> dict[str, np.ndarray]:
  """A source file's state dict {torch name: array}, without torch.

  Raises:
    CorruptWeightsError: not a safetensors file numpy can read.
  """
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
    raise CorruptWeightsError(
        f"Backbone weights {path} (config backbone.weights): not a readable safetensors file "
        f"({type(e).__name__}: {e}); give a float32 or float16 .safetensors state dict.") from e


def flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Nested variables -> {'params/conv1/kernel': leaf, ...}."""
  return flax.traverse_util.flatten_dict(variables, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def mismatch(flat: Mapping[str, Any], expected: Mapping[str, Sequence[int]]) -> str:
  """What differs between `flat` and float32 arrays of the `expected` keys and shapes, a few of
  each kind ("" when nothing does)."""
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = [f"{key} is {flat[key].dtype}{list(flat[key].shape)}, "
           f"expected float32{list(expected[key])}"
           for key in sorted(set(flat) & set(expected))
           if tuple(flat[key].shape) != tuple(expected[key]) or flat[key].dtype != np.float32]
  parts = []
  for kind, items in (("missing", missing), ("unexpected", unexpected), ("of wrong shape", wrong)):
    if items:
      more = f", ... (+{len(items) - 3})" if len(items) > 3 else ""
      parts.append(f"{len(items)} {kind}: {', '.join(items[:3])}{more}")
  return "; ".join(parts)


# Flax leaf -> torch leaf: conv/linear weights and BatchNorm weights are both torch `weight`.
_TORCH_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                 ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                 ("batch_stats", "var"): "running_var"}


def torch_key(flax_key: str) -> str:
  """Torch's name of a Flax variable, whose modules mirror torch's with indices joined by '_'.

  'params/layer2_0/downsample_1/scale' -> 'layer2.0.downsample.1.weight';
  'batch_stats/blocks_2_1/bn3/mean' -> 'blocks.2.1.bn3.running_mean'.
  """
  collection, *modules, leaf = flax_key.split("/")
  module = re.sub(r"_(\d+)(?=_\d|/|$)", r".\1", "/".join(modules)).replace("/", ".")
  return f"{module}.{_TORCH_LEAVES[collection, leaf]}"


def _torch_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """Flax HWIO conv kernel -> torch OIHW; (in, out) dense kernel -> (out, in)."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape[::-1]) if len(shape) == 2 else tuple(shape)


def _flax_value(value: np.ndarray) -> np.ndarray:
  """Inverse of `_torch_shape` on values (a depthwise (C, 1, kh, kw) becomes (kh, kw, 1, C))."""
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:
    value = value.T
  return np.ascontiguousarray(value)


def from_torch(state: Mapping[str, Any], expected: Mapping[str, Sequence[int]], *,
               ignore: tuple[str, ...] = (), where: str, backbone: str) -> dict[str, Any]:
  """A torch state dict (numpy values) -> the Flax variables {'params': ..., 'batch_stats': ...}.

  Every Flax variable of `expected` ('/'-joined path -> shape) is looked up under its
  `torch_key`; conv kernels go OIHW -> HWIO, dense kernels (out, in) -> (in, out), BatchNorm
  weight/bias -> params scale/bias, running mean/var -> batch_stats mean/var, all as float32.

  Args:
    state: torch name -> array.
    expected: the Flax variables the backbone needs.
    ignore: prefixes of torch names with no Flax counterpart (e.g. the ResNets' classifier "fc.");
      `num_batches_tracked` is always ignored.
    where: what `state` is, for errors ("Backbone weights x.safetensors (config ...)").
    backbone: what it should fit, for errors.

  Raises:
    IncompatibleWeightsError: keys missing or unexpected, or shapes that differ (torch names and
      torch layouts, a few of each).
  """
  names = {torch_key(key): key for key in expected}
  kept = {key: np.asarray(value, np.float32) for key, value in state.items()
          if not key.endswith(".num_batches_tracked") and not key.startswith(ignore)}
  problems = mismatch(kept, {key: _torch_shape(expected[flax]) for key, flax in names.items()})
  if problems:
    raise IncompatibleWeightsError(
        f"{where} do not fit {backbone}: {problems}. Give a state dict of this architecture "
        "with torchvision or timm key names.")
  return unflatten({flax: _flax_value(kept[key]) for key, flax in names.items()})


def serialize(variables: Mapping[str, Any]) -> bytes:
  """The bytes of a converted weights file holding `variables` (float32)."""
  return safetensors.numpy.save({key: np.ascontiguousarray(value, np.float32)
                                 for key, value in flatten(variables).items()})


def save_variables(path: pathlib.Path, variables: Mapping[str, Any],
                   meta: Mapping[str, Any]) -> None:
  """Writes `variables` to `path` and `meta` plus the file's sha256 to its json sidecar."""
  data = serialize(variables)
  sidecar = dict(meta, format=FORMAT, file=path.name, sha256=hashlib.sha256(data).hexdigest())
  for target, content in ((sidecar_path(path), json.dumps(sidecar, indent=2).encode()),
                          (path, data)):
    fileio.atomic_write(target, content)


def recorded_sha256(path: pathlib.Path, *, remake: str = "the command that made it") -> str:
  """The sha256 of `path` as its sidecar records it (`read_variables` checks the content).

  Raises:
    CorruptWeightsError: the sidecar is missing or unreadable.
  """
  try:
    return json.loads(sidecar_path(path).read_text())["sha256"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise _corrupt(path, f"its sidecar {sidecar_path(path)} is missing or unreadable ({e})",
                   remake) from e


def _corrupt(path: pathlib.Path, why: str, remake: str) -> CorruptWeightsError:
  return CorruptWeightsError(f"Converted backbone weights {path}: {why}. Delete it and rerun\n  "
                             f"{remake}")


def read_variables(path: pathlib.Path, expected: Mapping[str, Sequence[int]], *,
                   remake: str) -> dict[str, Any]:
  """Reads and checks a file written by `save_variables`.

  Args:
    path: the safetensors file (it exists).
    expected: '/'-joined key -> shape the backbone needs.
    remake: how to make the file again, quoted in errors (a command).

  Returns:
    Nested {'params': ..., 'batch_stats': ...} of float32 numpy arrays.

  Raises:
    CorruptWeightsError: sidecar missing or unreadable, sha256 mismatch, unreadable safetensors
      header, or keys/shapes that differ from `expected`.
  """
  sha256 = recorded_sha256(path, remake=remake)
  data = path.read_bytes()
  if hashlib.sha256(data).hexdigest() != sha256:
    raise _corrupt(path, f"sha256 differs from the one recorded in {sidecar_path(path)}", remake)
  try:
    flat = safetensors.numpy.load(data)
  except safetensors.SafetensorError as e:
    raise _corrupt(path, f"not a readable safetensors file ({e})", remake) from e
  problems = mismatch(flat, expected)
  if problems:
    raise _corrupt(path, f"does not fit the backbone: {problems}", remake)
  return unflatten(flat)
