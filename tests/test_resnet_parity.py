"""Flax ResNets: stage selection, and parity with torchvision (random init, eval mode)."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require
from pbas_jax import backbones
from pbas_jax import convert


def test_stages_in_requested_order_and_nothing_past_the_deepest():
  module = backbones.create("resnet50", ("layer3", "layer1"))
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  outs = jax.eval_shape(module.apply, variables, jnp.zeros((2, 72, 101, 3)))
  # torch's padded convs give ceil(n / stride) on every stage.
  assert [o.shape for o in outs] == [(2, 5, 7, 1024), (2, 18, 26, 256)]
  blocks = {name.split("_")[0] for name in variables["params"]}
  assert blocks == {"conv1", "bn1", "layer1", "layer2", "layer3"}
  with pytest.raises(ValueError, match="layers"):
    backbones.create("resnet50", ("layer5",))
  with pytest.raises(ValueError, match="resnet18"):
    backbones.create("resnet19", ("layer2",))


def assert_layer2_layer3_match(arch: str, variables, model, images: np.ndarray) -> None:
  """Flax `arch` with `variables` gives torch `model`'s layer2 and layer3 on `images` (B, H, W, 3)."""
  import torch  # pylint: disable=g-import-not-at-top
  captured = {}
  for name in ("layer2", "layer3"):
    getattr(model, name).register_forward_hook(
        lambda _, __, out, name=name: captured.__setitem__(name, out.permute(0, 2, 3, 1).numpy()))
  with torch.no_grad():
    model(torch.from_numpy(images.transpose(0, 3, 1, 2)))

  module = backbones.create(arch, ("layer2", "layer3"))
  with jax.default_matmul_precision("highest"):
    layer2, layer3 = jax.jit(module.apply)(variables, images)
  for name, got in (("layer2", layer2), ("layer3", layer3)):
    want = captured[name]
    assert got.shape == want.shape
    error = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    print(f"{arch} {name}: max|diff|/max|torch| = {error:.2e}")
    assert error <= 1e-5, (arch, name, error)


@pytest.mark.parity
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet101", "wide_resnet50_2"])
def test_layer2_layer3_match_torchvision(arch):
  require(importlib.util.find_spec("torchvision") is not None,
          "torchvision missing: install the convert extra")
  model = convert.torch_model(arch, "random", seed=0)
  images = np.random.default_rng(0).standard_normal((1, 288, 288, 3)).astype(np.float32)
  assert_layer2_layer3_match(arch, convert.variables_from_torch(arch, model), model, images)
