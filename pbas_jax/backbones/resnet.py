"""torchvision ResNets (resnet18/50/101, wide_resnet50_2) as frozen Flax Linen modules.

The modules compute exactly what torchvision computes in eval mode: explicit PyTorch paddings
(stem 3, 3x3 convs 1, max-pool 1 padded with -inf; 'SAME' would pad stride-2 layers
asymmetrically), the stride on the 3x3 conv of a Bottleneck (torchvision's "ResNet v1.5"), and
BatchNorm with running statistics and eps 1e-5. Inputs are NHWC, ImageNet-normalized float32.

Module names mirror torchvision's: torch `layer2.0.downsample.1.running_var` is Flax
`batch_stats/layer2_0/downsample_1/var`, which keeps conversion (`weights.from_torch`) a
renaming; timm's ResNets (e.g. `wide_resnet50_2.tv_in1k`) use the same names.
"""
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

LEVELS = ("layer1", "layer2", "layer3", "layer4")

# torchvision initializes every conv with kaiming_normal_(mode="fan_out", nonlinearity="relu"):
# an untruncated normal with std sqrt(2 / (out_channels * kh * kw)).
_torch_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, strides: int, name: str) -> nn.Conv:
  pad = (kernel - 1) // 2  # torch padding: 3 for 7x7, 1 for 3x3, 0 for 1x1, both sides
  return nn.Conv(features, (kernel, kernel), strides=strides, padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=_torch_conv_init, name=name)


def _max_pool_axis(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  """Maximum over windows of 3 at stride 2 along `axis` (1 or 2 of NHWC), padded with -inf by 1.

  The padded axis (even length 2 (n_out + 1)) is read as n_out + 1 pairs: window i is both
  elements of pair i and the first of pair i + 1.
  """
  n = x.shape[axis]
  n_out = (n - 1) // 2 + 1
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 2 * n_out + 1 - n)
  x = jnp.pad(x, pad, constant_values=-jnp.inf)
  pairs = x.reshape(*x.shape[:axis], n_out + 1, 2, *x.shape[axis + 1:])
  first, second = (jnp.take(pairs, i, axis=axis + 1) for i in (0, 1))
  window = lambda v, start: jax.lax.slice_in_dim(v, start, start + n_out, axis=axis)
  return jnp.maximum(jnp.maximum(window(first, 0), window(second, 0)), window(first, 1))


def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  """torch MaxPool2d(3, stride 2, padding 1) of the stem (pads with -inf), NHWC: one axis at a
  time (a 2-D window's maximum is the maximum of its rows' maxima).

  The same values as `nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`, written with pads,
  reshapes and unit-stride slices so that the detector exports to ONNX: jax2onnx's `nn.max_pool`
  plugin takes only 'SAME'/'VALID' paddings (neither is torch's symmetric 1 at stride 2), it
  lowers `lax.reduce_window_max` to a MaxPool over all four axes, which onnxruntime rejects, and
  strided slices to gathers.
  """
  return _max_pool_axis(_max_pool_axis(x, 1), 2)


def _bn(name: str) -> nn.BatchNorm:
  # Frozen: running statistics only (scale 1 / bias 0 / mean 0 / var 1 at init, as torch).
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convs (resnet18/34). `planes` output channels."""
  planes: int
  strides: int = 1
  base_width: int = 64

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.relu(_bn("bn1")(_conv(self.planes, 3, self.strides, "conv1")(x)))
    y = _bn("bn2")(_conv(self.planes, 3, 1, "conv2")(y))
    if self.strides != 1 or x.shape[-1] != self.planes:
      x = _bn("downsample_1")(_conv(self.planes, 1, self.strides, "downsample_0")(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion; `base_width` 128 makes it wide."""
  planes: int
  strides: int = 1
  base_width: int = 64

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    width = self.planes * self.base_width // 64
    out = self.planes * 4
    y = nn.relu(_bn("bn1")(_conv(width, 1, 1, "conv1")(x)))
    y = nn.relu(_bn("bn2")(_conv(width, 3, self.strides, "conv2")(y)))
    y = _bn("bn3")(_conv(out, 1, 1, "conv3")(y))
    if self.strides != 1 or x.shape[-1] != out:
      x = _bn("downsample_1")(_conv(out, 1, self.strides, "downsample_0")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A torchvision ResNet trunk returning the requested stage outputs.

  Attributes:
    block: `BasicBlock` or `Bottleneck`.
    stage_sizes: blocks per stage (layer1..layer4).
    layers: stage names to return, in this order; nothing past the deepest one is computed
      (and no parameters past it exist).
    base_width: 64, or 128 for wide_resnet50_2.
  """
  block: Callable[..., nn.Module]
  stage_sizes: Sequence[int]
  layers: Sequence[str]
  base_width: int = 64

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """(B, H, W, 3) -> tuple of (B, H/s, W/s, C) for s = 4, 8, 16, 32 (layer1..layer4)."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet expects NHWC images (B, H, W, 3); got shape {x.shape}.")
    last = max(LEVELS.index(name) for name in self.layers)
    x = nn.relu(_bn("bn1")(_conv(64, 7, 2, "conv1")(x)))
    x = max_pool_3x3_s2(x)
    outputs = {}
    for stage, blocks in enumerate(self.stage_sizes[:last + 1]):
      for index in range(blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = self.block(64 * 2**stage, strides, self.base_width,
                       name=f"{LEVELS[stage]}_{index}")(x)
      outputs[LEVELS[stage]] = x
    return tuple(outputs[name] for name in self.layers)


ARCHS = {
    "resnet18": dict(block=BasicBlock, stage_sizes=(2, 2, 2, 2)),
    "resnet50": dict(block=Bottleneck, stage_sizes=(3, 4, 6, 3)),
    "resnet101": dict(block=Bottleneck, stage_sizes=(3, 4, 23, 3)),
    "wide_resnet50_2": dict(block=Bottleneck, stage_sizes=(3, 4, 6, 3), base_width=128),
}


def module_factory(arch: str) -> Callable[[Sequence[str]], ResNet]:
  """`layers -> ResNet` for one of `ARCHS`."""
  return lambda layers: ResNet(layers=tuple(layers), **ARCHS[arch])


def torchvision_model(arch: str, weights: str | None):
  """The torchvision model (eval mode); `weights` None = torchvision's random init. Needs torch."""
  import torchvision  # pylint: disable=g-import-not-at-top  (convert extra only)
  return torchvision.models.get_model(arch, weights=weights).eval()
