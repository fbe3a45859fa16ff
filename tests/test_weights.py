"""Converted weight files: round trip, torch-free random weights, clear errors."""
import hashlib
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from conftest import require
from pbas_jax import backbones
from pbas_jax import convert
from pbas_jax.backbones import weights as weights_lib

NAME = "resnet18"  # the smallest registered backbone keeps files and shape checks quick


def _flat(variables):
  return {k: np.asarray(v) for k, v in weights_lib.flatten(variables).items()}


def _assert_identical(a, b):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype == np.float32, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(name="saved")
def _saved(tmp_path):
  """A resnet18 "random" seed-5 file written from the JAX-side init: (cache dir, path, variables)."""
  variables = backbones.init_variables(NAME, seed=5)
  path = weights_lib.weights_path(NAME, "random", seed=5, cache_dir=tmp_path)
  weights_lib.save_variables(path, variables, dict(backbone=NAME, weights="random", seed=5))
  return tmp_path, path, variables


@pytest.mark.parity
def test_convert_cli_file_loads_back_bit_identically(tmp_path):
  require(importlib.util.find_spec("torchvision") is not None,
          "torchvision missing: install the convert extra")
  convert.main(["--arch", NAME, "--weights", "random", "--seed", "3", "--cache_dir", str(tmp_path)])
  want = convert.variables_from_torch(NAME, convert.torch_model(NAME, "random", seed=3))
  _assert_identical(backbones.load_variables(NAME, "random", seed=3, cache_dir=tmp_path), want)
  sidecar = json.loads((tmp_path / f"{NAME}-random-seed3.json").read_text())
  assert (sidecar["backbone"], sidecar["weights"], sidecar["seed"]) == (NAME, "random", 3)
  assert len(sidecar["sha256"]) == 64 and "manual_seed(3)" in sidecar["source"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}-random-seed3.json",
                                                        f"{NAME}-random-seed3.safetensors"]


def test_saved_file_loads_back_bit_identically(saved):
  cache, _, variables = saved
  _assert_identical(backbones.load_variables(NAME, "random", seed=5, cache_dir=cache), variables)


def test_random_without_file_is_torch_like_jax_init(tmp_path, monkeypatch):
  monkeypatch.setenv("PBAS_JAX_CACHE", str(tmp_path))
  a = backbones.load_variables(NAME, "random", seed=0)
  _assert_identical(a, backbones.init_variables(NAME, seed=0))
  b = backbones.load_variables(NAME, "random", seed=1)
  kernel_a = a["params"]["layer2_0"]["conv2"]["kernel"]
  kernel_b = b["params"]["layer2_0"]["conv2"]["kernel"]
  assert not np.array_equal(kernel_a, kernel_b)
  # torchvision: kaiming_normal_(mode="fan_out", relu) = N(0, 2 / (out * kh * kw)), BN 1/0, 0/1.
  for kernel in (kernel_a, kernel_b):
    assert abs(np.std(kernel) / np.sqrt(2 / (128 * 9)) - 1) < 0.02
    assert abs(np.mean(kernel)) < 0.002
  for key, value in _flat(a).items():
    constant = {"scale": 1.0, "var": 1.0, "bias": 0.0, "mean": 0.0}.get(key.split("/")[-1])
    if constant is not None:
      np.testing.assert_array_equal(value, constant, err_msg=key)


def test_missing_file_names_file_and_command(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    backbones.load_variables("wide_resnet50_2", "IMAGENET1K_V1", cache_dir=tmp_path)
  assert isinstance(info.value, backbones.WeightsNotFoundError)
  message = str(info.value)
  assert str(tmp_path / "wide_resnet50_2-IMAGENET1K_V1.safetensors") in message
  assert (f"python -m pbas_jax.convert --arch wide_resnet50_2 --weights IMAGENET1K_V1 "
          f"--cache_dir {tmp_path}") in message
  assert ".safetensors" in message


def _rewrite(path: pathlib.Path, data: bytes, fix_sha: bool) -> None:
  path.write_bytes(data)
  if fix_sha:  # make the sidecar agree, so that the content check itself must catch it
    sidecar_path = weights_lib.sidecar_path(path)
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["sha256"] = hashlib.sha256(data).hexdigest()
    sidecar_path.write_text(json.dumps(sidecar))


@pytest.mark.parametrize("damage, match", [
    ("truncate", "sha256 differs"),
    ("garbage_header", "not a readable safetensors"),
    ("drop_key", "1 missing: params/layer4_1/bn2/scale"),
    ("wrong_shape", r"params/conv1/kernel is float32\[7, 7, 3, 32\], expected float32\[7, 7, 3, 64\]"),
    ("no_sidecar", "sidecar .* missing or unreadable"),
])
def test_corrupt_file_gives_clear_error(saved, damage, match):
  cache, path, variables = saved
  flat = _flat(variables)
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[:-100])
  elif damage == "garbage_header":
    _rewrite(path, b"\xff" * 8 + b"not json" * 10, fix_sha=True)
  elif damage in ("drop_key", "wrong_shape"):
    if damage == "drop_key":
      del flat["params/layer4_1/bn2/scale"]
    else:
      flat["params/conv1/kernel"] = flat["params/conv1/kernel"][..., :32]
    weights_lib.save_variables(path, weights_lib.unflatten(flat), dict(backbone=NAME))
  else:
    weights_lib.sidecar_path(path).unlink()
  with pytest.raises(backbones.CorruptWeightsError, match=match) as info:
    backbones.load_variables(NAME, "random", seed=5, cache_dir=cache)
  assert f"--arch {NAME} --weights random --seed 5" in str(info.value)
  assert str(path) in str(info.value)


def test_weight_ids_and_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("PBAS_JAX_CACHE", str(tmp_path))
  assert weights_lib.weights_path(NAME, "IMAGENET1K_V1") == (
      tmp_path / f"{NAME}-IMAGENET1K_V1.safetensors")
  assert weights_lib.weights_path(NAME, "random", seed=2, cache_dir="") == (
      tmp_path / f"{NAME}-random-seed2.safetensors")
  monkeypatch.delenv("PBAS_JAX_CACHE")
  assert weights_lib.cache_root() == pathlib.Path.home() / ".cache/pbas_jax"
  for bad in ("DEFAULT", "../x", ""):
    with pytest.raises(ValueError, match="backbone.weights"):
      weights_lib.weights_path(NAME, bad)


def test_torch_names_of_flax_variables():
  assert weights_lib.torch_key("params/layer2_0/downsample_1/scale") == "layer2.0.downsample.1.weight"
  assert weights_lib.torch_key("batch_stats/layer1_0/bn1/var") == "layer1.0.bn1.running_var"
  assert weights_lib.torch_key("batch_stats/blocks_2_1/bn3/mean") == "blocks.2.1.bn3.running_mean"
  assert weights_lib.torch_key("params/conv_stem/kernel") == "conv_stem.weight"
  assert weights_lib.torch_key("params/classifier/bias") == "classifier.bias"
  for name in backbones.names():  # one torch name per variable
    shapes = backbones.variable_shapes(name)
    assert len({weights_lib.torch_key(key) for key in shapes}) == len(shapes), name


def test_weights_sha256_is_that_of_the_loaded_file(saved, tmp_path):
  cache, path, _ = saved
  file_sha = hashlib.sha256(path.read_bytes()).hexdigest()
  assert backbones.weights_sha256(NAME, "random", seed=5, cache_dir=cache) == file_sha
  # Without a file: the JAX-side init, hashed as the file holding it (`saved` wrote that init).
  assert backbones.weights_sha256(NAME, "random", seed=5, cache_dir=tmp_path / "none") == file_sha
  assert backbones.weights_sha256(NAME, "random", seed=6, cache_dir=tmp_path / "none") != file_sha
  assert not (tmp_path / "none").exists()
