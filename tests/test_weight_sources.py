"""backbone.weights as a .safetensors state dict (torchvision or timm names) or an hf-hub id:
converted without torch into the weight cache once, forward equal to torch's, clear errors, and
the main job training a WideResNet50 from such a file where torch cannot be imported."""
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy

from conftest import require
from pbas_jax import backbones
from test_resnet_parity import assert_layer2_layer3_match

REPO = pathlib.Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "timm")


def _require(*modules: str) -> None:
  for module in modules:
    require(importlib.util.find_spec(module) is not None,
            f"{module} missing: install the convert extra")


def _save_state(model, path: pathlib.Path) -> pathlib.Path:
  """`model.state_dict()` as a .safetensors file, written through numpy (torch names, as is)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file({key: np.ascontiguousarray(value.detach().cpu().numpy())
                               for key, value in model.state_dict().items()}, str(path))
  return path


def _torchvision(arch: str, seed: int):
  _require("torch", "torchvision")
  from pbas_jax import convert  # pylint: disable=g-import-not-at-top  (imports torch when used)
  return convert.torch_model(arch, "random", seed=seed)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  """A random torchvision resnet18 (seed 0) and its state dict saved as .safetensors."""
  model = _torchvision("resnet18", seed=0)
  return model, _save_state(model, tmp_path_factory.mktemp("src") / "resnet18.safetensors")


def _cache_files(cache: pathlib.Path) -> list[str]:
  return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_torchvision_file_converts_once_and_matches_torch(resnet18_file, tmp_path):
  model, source = resnet18_file
  cache = tmp_path / "cache"
  variables = backbones.load_variables("resnet18", str(source), cache_dir=cache)

  source_sha = hashlib.sha256(source.read_bytes()).hexdigest()
  converted = cache / f"resnet18-src-{source_sha[:16]}.safetensors"
  assert _cache_files(cache) == [converted.with_suffix(".json").name, converted.name]
  sidecar = json.loads(converted.with_suffix(".json").read_text())
  assert (sidecar["backbone"], sidecar["weights"], sidecar["source_sha256"]) == (
      "resnet18", str(source), source_sha)
  assert backbones.weights_sha256("resnet18", str(source), cache_dir=cache) == (
      hashlib.sha256(converted.read_bytes()).hexdigest())

  images = np.random.default_rng(0).standard_normal((2, 64, 80, 3)).astype(np.float32)
  assert_layer2_layer3_match("resnet18", variables, model, images)

  # Reused afterwards: not converted again.
  mtime = converted.stat().st_mtime_ns
  again = backbones.load_variables("resnet18", str(source), cache_dir=cache)
  np.testing.assert_array_equal(again["params"]["layer3_1"]["conv2"]["kernel"],
                                variables["params"]["layer3_1"]["conv2"]["kernel"])
  assert converted.stat().st_mtime_ns == mtime
  # Other values at another path: another converted file.
  other = _save_state(_torchvision("resnet18", seed=1), tmp_path / "other.safetensors")
  other_sha = backbones.weights_sha256("resnet18", str(other), cache_dir=cache)
  assert other_sha != backbones.weights_sha256("resnet18", str(source), cache_dir=cache)
  assert len(_cache_files(cache)) == 4


def test_timm_wide_resnet50_2_keys(tmp_path):
  """timm's ResNets carry torchvision's names (so does its published wide_resnet50_2.tv_in1k)."""
  _require("torch", "timm")
  import timm  # pylint: disable=g-import-not-at-top
  model = timm.create_model("wide_resnet50_2", pretrained=False)
  source = _save_state(model, tmp_path / "timm_wrn50.safetensors")
  state = safetensors.numpy.load_file(str(source))
  variables = backbones.load_variables("wide_resnet50_2", str(source), cache_dir=tmp_path / "c")
  np.testing.assert_array_equal(variables["params"]["layer3_5"]["conv2"]["kernel"],
                                state["layer3.5.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["layer2_0"]["downsample_1"]["var"],
                                state["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(variables["params"]["layer1_2"]["bn3"]["scale"],
                                state["layer1.2.bn3.weight"])


def _edited(resnet18_file, tmp_path, edit) -> pathlib.Path:
  state = safetensors.numpy.load_file(str(resnet18_file[1]))
  edit(state)
  path = tmp_path / "edited.safetensors"
  safetensors.numpy.save_file(state, str(path))
  return path


def test_files_that_do_not_fit_say_what_differs(resnet18_file, tmp_path):
  cache = tmp_path / "cache"
  source = resnet18_file[1]
  with pytest.raises(backbones.IncompatibleWeightsError) as info:
    backbones.load_variables("resnet50", str(source), cache_dir=cache)
  message = str(info.value)
  assert f"Backbone weights {source} (config backbone.weights)" in message
  assert "do not fit backbone resnet50 (config backbone.name)" in message
  assert "missing: layer1.0.bn3.bias, layer1.0.bn3.running_mean" in message
  assert "of wrong shape: layer1.0.conv1.weight is float32[64, 64, 3, 3], expected " in message

  dropped = _edited(resnet18_file, tmp_path, lambda s: s.pop("layer4.1.bn2.weight"))
  with pytest.raises(backbones.IncompatibleWeightsError,
                     match=r"\(config backbone.name\): 1 missing: layer4\.1\.bn2\.weight\. Give"):
    backbones.load_variables("resnet18", str(dropped), cache_dir=cache)

  def narrow(state):
    state["conv1.weight"] = np.ascontiguousarray(state["conv1.weight"][:32])
    state["blocks.0.0.conv_dw.weight"] = np.zeros((32, 1, 3, 3), np.float32)
  narrowed = _edited(resnet18_file, tmp_path, narrow)
  with pytest.raises(backbones.IncompatibleWeightsError,
                     match=r"1 unexpected: blocks\.0\.0\.conv_dw\.weight; 1 of wrong shape: "
                           r"conv1\.weight is float32\[32, 3, 7, 7\], expected float32\[64, 3, 7, 7\]"):
    backbones.load_variables("resnet18", str(narrowed), cache_dir=cache)
  assert _cache_files(cache) == []  # nothing converted


def test_missing_or_unreadable_file(tmp_path):
  cache = tmp_path / "cache"
  missing = tmp_path / "nowhere" / "wrn50.safetensors"
  with pytest.raises(backbones.WeightsNotFoundError) as info:
    backbones.load_variables("wide_resnet50_2", str(missing), cache_dir=cache)
  message = str(info.value)
  assert f"{missing} (config backbone.weights) does not exist" in message
  assert "https://huggingface.co/timm/wide_resnet50_2.tv_in1k" in message

  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header" * 4)
  with pytest.raises(backbones.CorruptWeightsError,
                     match=f"{garbage} \\(config backbone.weights\\): not a readable safetensors"):
    backbones.load_variables("resnet18", str(garbage), cache_dir=cache)
  with pytest.raises(ValueError, match="a .safetensors file or hf-hub:<repo>"):
    backbones.load_variables("resnet18", str(tmp_path / "weights.pth"), cache_dir=cache)
  assert _cache_files(cache) == []


def _python_without(blocked: tuple[str, ...], code: str, env: dict[str, str]):
  """Runs `code` in a fresh interpreter where importing `blocked` fails."""
  prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
  return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **env))


def test_hub_id_from_the_offline_hub_cache(resnet18_file, tmp_path):
  _require("huggingface_hub")
  source = resnet18_file[1]
  # The layout huggingface_hub keeps: <cache>/models--<org>--<name>/{refs/main, snapshots/<rev>/}.
  revision = "0123456789abcdef0123456789abcdef01234567"
  repo_dir = tmp_path / "hf" / "hub" / "models--timm--resnet18.tv_in1k"
  (repo_dir / "snapshots" / revision).mkdir(parents=True)
  shutil.copy(source, repo_dir / "snapshots" / revision / "model.safetensors")
  (repo_dir / "refs").mkdir()
  (repo_dir / "refs" / "main").write_text(revision)
  cache = tmp_path / "cache"
  result = _python_without(BLOCKED, f"""
      from pbas_jax import backbones
      print("sha", backbones.weights_sha256("resnet18", "hf-hub:timm/resnet18.tv_in1k",
                                            cache_dir={str(cache)!r}))
      for weights in ("hf-hub:timm/absent", "hf-hub:timm/resnet18.tv_in1k"):
        if weights == "hf-hub:timm/resnet18.tv_in1k":
          sys.modules["huggingface_hub"] = None  # not installed
        try:
          backbones.load_variables("resnet18", weights, cache_dir={str(cache)!r})
        except backbones.WeightsNotFoundError as e:
          print("error", e)
      print("torch imported:", [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}
                                and sys.modules[m] is not None])
  """, env=dict(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"))
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  # The hub file is the same content as `source`: the same converted file, made by the hub run.
  assert f"sha {backbones.weights_sha256('resnet18', str(source), cache_dir=cache)}" in out
  (sidecar,) = cache.glob("*.json")
  assert json.loads(sidecar.read_text())["weights"] == "hf-hub:timm/resnet18.tv_in1k"
  assert "hf-hub:timm/absent" in out and "HF_HUB_OFFLINE=1" in out
  assert "hf download timm/absent model.safetensors" in out
  assert "pip install 'pbas_jax[hub]'" in out
  assert "torch imported: []" in out


# A `sitecustomize` on PYTHONPATH: in every interpreter of the run (children too), importing torch,
# torchvision or timm fails; at exit it records whether any got imported anyway.
_SITECUSTOMIZE = """
import atexit, importlib.abc, os, sys

BLOCKED = {blocked!r}


class _Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{{name}} is blocked in this test (torch-free environment)")
    return None


sys.meta_path.insert(0, _Block())


@atexit.register
def _report():
  imported = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
  with open(os.path.join({report!r}, f"imports-{{os.getpid()}}.txt"), "w") as f:
    f.write(",".join(imported))
"""


@pytest.mark.slow
def test_main_job_trains_wide_resnet50_from_safetensors_without_torch(tmp_path, mpdd_root):
  source = _save_state(_torchvision("wide_resnet50_2", seed=0), tmp_path / "wrn50.safetensors")
  blocker, report = tmp_path / "blocker", tmp_path / "report"
  blocker.mkdir()
  report.mkdir()
  (blocker / "sitecustomize.py").write_text(
      _SITECUSTOMIZE.format(blocked=BLOCKED, report=str(report)))
  workdir, cache = tmp_path / "run", tmp_path / "cache"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]),
             PBAS_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as a user's CPU run
  cmd = [sys.executable, "-m", "pbas_jax.main", "--config=configs/mpdd.py:smoke",
         f"--config.dataset.root={mpdd_root}", "--config.dataset.classes=metal_plate",
         "--config.backbone.name=wide_resnet50_2", f"--config.backbone.weights={source}",
         "--config.train.epochs=1", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert (workdir / "results.json").exists()
  reports = list(report.iterdir())
  assert reports, "the torch blocker did not run"
  assert all(r.read_text() == "" for r in reports), [r.read_text() for r in reports]
  # The run converted the file into its weight cache.
  sha = hashlib.sha256(source.read_bytes()).hexdigest()
  assert (cache / f"wide_resnet50_2-src-{sha[:16]}.safetensors").exists()
