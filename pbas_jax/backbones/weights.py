"""Converted backbone weights on disk, read without torch.

One backbone's variables are one safetensors file, keys '/'-joined Flax paths
('params/layer2_0/conv1/kernel', 'batch_stats/bn1/mean'), float32, beside a json sidecar holding
the source weight id and the file's sha256:

    <cache_dir>/<backbone>-<weights>.safetensors        e.g. wide_resnet50_2-IMAGENET1K_V1
    <cache_dir>/<backbone>-<weights>.json
    <cache_dir>/<backbone>-random-seed<N>.safetensors   (`--weights random --seed N`)

Files are written to a temporary name and renamed, the sidecar first, so a crash never leaves a
weights file that passes its check with the wrong content.
"""
import hashlib
import json
import os
import pathlib
import re
import shlex
from typing import Any, Mapping

import flax.traverse_util
import numpy as np
import safetensors
import safetensors.numpy

from pbas_jax import fileio

FORMAT = 1


class WeightsNotFoundError(FileNotFoundError):
  """No converted weights file; the message names the file and the command that makes it."""


class CorruptWeightsError(ValueError):
  """A converted weights file that cannot be used as it is; the message says how to remake it."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """`cache_dir`, else $PBAS_JAX_CACHE, else ~/.cache/pbas_jax ("" counts as unset)."""
  root = cache_dir or os.environ.get("PBAS_JAX_CACHE") or pathlib.Path.home() / ".cache/pbas_jax"
  return pathlib.Path(root).expanduser()


def weights_path(name: str, weights: str, *, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where the converted variables of backbone `name` with weight id `weights` live."""
  if not re.fullmatch(r"[A-Za-z0-9_.]+", weights) or weights == "DEFAULT":
    raise ValueError(f"Backbone weights {weights!r} (config backbone.weights): give a concrete "
                     "torchvision weight id such as IMAGENET1K_V1, or 'random'.")
  stem = f"{name}-random-seed{seed}" if weights == "random" else f"{name}-{weights}"
  return cache_root(cache_dir) / f"{stem}.safetensors"


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


def flatten(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Nested variables -> {'params/conv1/kernel': leaf, ...}."""
  return flax.traverse_util.flatten_dict(variables, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def shape_problems(flat: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
  """Missing, unexpected and wrongly shaped or typed keys (empty when `flat` fits `expected`)."""
  problems = [f"missing {key}" for key in sorted(set(expected) - set(flat))]
  problems += [f"unexpected {key}" for key in sorted(set(flat) - set(expected))]
  for key in sorted(set(flat) & set(expected)):
    value = flat[key]
    if tuple(value.shape) != tuple(expected[key]) or value.dtype != np.float32:
      problems.append(f"{key} is {value.dtype}{list(value.shape)}, "
                      f"expected float32{list(expected[key])}")
  return problems


def save_variables(path: pathlib.Path, variables: Mapping[str, Any],
                   meta: Mapping[str, Any]) -> None:
  """Writes `variables` to `path` and `meta` plus the file's sha256 to its json sidecar."""
  flat = {key: np.ascontiguousarray(value, np.float32)
          for key, value in flatten(variables).items()}
  data = safetensors.numpy.save(flat)
  sidecar = dict(meta, format=FORMAT, file=path.name, sha256=hashlib.sha256(data).hexdigest())
  for target, content in ((sidecar_path(path), json.dumps(sidecar, indent=2).encode()),
                          (path, data)):
    fileio.atomic_write(target, content)


def read_variables(path: pathlib.Path, expected: Mapping[str, tuple[int, ...]], *,
                   command: str) -> dict[str, Any]:
  """Reads and checks a file written by `save_variables`.

  Args:
    path: the safetensors file.
    expected: '/'-joined key -> shape the backbone needs.
    command: the command that (re)makes the file, quoted in errors.

  Returns:
    Nested {'params': ..., 'batch_stats': ...} of float32 numpy arrays.

  Raises:
    WeightsNotFoundError: `path` does not exist.
    CorruptWeightsError: sidecar missing or unreadable, sha256 mismatch, unreadable safetensors
      header, or keys/shapes that differ from `expected`.
  """
  if not path.exists():
    raise WeightsNotFoundError(f"Converted backbone weights not found: {path}. Make them with\n  "
                               f"{command}")

  def corrupt(why: str) -> CorruptWeightsError:
    return CorruptWeightsError(f"Converted backbone weights {path}: {why}. Delete it and rerun\n  "
                               f"{command}")

  try:
    sidecar = json.loads(sidecar_path(path).read_text())
    sha256 = sidecar["sha256"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise corrupt(f"its sidecar {sidecar_path(path)} is missing or unreadable ({e})") from e
  data = path.read_bytes()
  if hashlib.sha256(data).hexdigest() != sha256:
    raise corrupt(f"sha256 differs from the one recorded in {sidecar_path(path)}")
  try:
    flat = safetensors.numpy.load(data)
  except safetensors.SafetensorError as e:
    raise corrupt(f"not a readable safetensors file ({e})") from e
  problems = shape_problems(flat, expected)
  if problems:
    raise corrupt(f"does not fit the backbone: {'; '.join(problems[:5])}"
                  + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
  return unflatten(flat)
