"""Frozen ImageNet backbones (Flax Linen) and their converted torchvision weights.

    module = backbones.create("wide_resnet50_2", ("layer2", "layer3"))
    variables = backbones.load_variables("wide_resnet50_2", "IMAGENET1K_V1")
    layer2, layer3 = module.apply(variables, images)        # images: (B, H, W, 3)

Weights are made once by `python -m pbas_jax.convert` (needs torch) and loaded here without torch.
A new backbone is one `REGISTRY` entry.
"""
import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pbas_jax.backbones import efficientnet
from pbas_jax.backbones import resnet
from pbas_jax.backbones import weights as weights_lib
from pbas_jax.backbones.weights import CorruptWeightsError, WeightsNotFoundError  # pylint: disable=unused-import

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build, convert and initialize one backbone.

  Attributes:
    module: `layers -> nn.Module`; the module maps (B, H, W, 3) images to a tuple of the requested
      feature maps (B, h, w, C), in the requested order. Its initializers must follow torch's
      init distributions (they define the torch-free "random" weights).
    levels: the feature-level names `layers` may use, shallow to deep.
    convert: torch `state_dict` (numpy values) -> Flax variables.
    torch_model: weights id (None = random init) -> the torch model in eval mode (convert only).
    ensure_converted: for weights shipped inside an installed package, `(weights, cache_dir=)`
      makes the converted file on first use (torch needed only then); None = convert by hand.
  """
  module: Callable[[Sequence[str]], nn.Module]
  levels: tuple[str, ...]
  convert: Callable[[Mapping[str, np.ndarray]], Variables]
  torch_model: Callable[[str | None], Any]
  ensure_converted: Callable[..., Any] | None = None


def _torchvision_resnet(arch: str) -> BackboneSpec:
  return BackboneSpec(module=resnet.module_factory(arch), levels=resnet.LEVELS,
                      convert=resnet.convert_state_dict,
                      torch_model=functools.partial(resnet.torchvision_model, arch))


REGISTRY: dict[str, BackboneSpec] = {
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet50": _torchvision_resnet("resnet50"),
    "resnet101": _torchvision_resnet("resnet101"),
    "wide_resnet50_2": _torchvision_resnet("wide_resnet50_2"),
    "efficientnet_lite0": BackboneSpec(
        module=efficientnet.EfficientNetLite0, levels=efficientnet.LEVELS,
        convert=efficientnet.convert_state_dict, torch_model=efficientnet.timm_model,
        ensure_converted=efficientnet.ensure_converted),
}


def names() -> list[str]:
  """The registered backbone names."""
  return sorted(REGISTRY)


def spec(name: str) -> BackboneSpec:
  if name not in REGISTRY:
    raise ValueError(f"Unknown backbone {name!r} (config backbone.name); choose one of {names()}.")
  return REGISTRY[name]


def create(name: str, layers: Sequence[str]) -> nn.Module:
  """The backbone `name` returning the feature maps `layers` (e.g. ("layer2", "layer3"))."""
  levels = spec(name).levels
  bad = [layer for layer in layers if layer not in levels]
  if not layers or bad:
    raise ValueError(f"Backbone {name!r}: layers {tuple(layers)} must be a non-empty selection of "
                     f"{levels} (config backbone.layers).")
  return spec(name).module(tuple(layers))


def variable_shapes(name: str) -> dict[str, tuple[int, ...]]:
  """'/'-joined variable path -> shape, for the full backbone (all levels)."""
  module = create(name, spec(name).levels)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  return {path: leaf.shape for path, leaf in weights_lib.flatten(shapes).items()}


@functools.lru_cache(maxsize=None)
def _jitted_init(name: str) -> Callable[[jax.Array], Variables]:
  module = create(name, spec(name).levels)
  return jax.jit(lambda key: module.init(key, jnp.zeros((1, 64, 64, 3), jnp.float32)))


def init_variables(name: str, seed: int) -> Variables:
  """Torch-free random weights for all levels: the module's (torch-like) initializers.

  For the ResNets: kaiming-normal (fan_out, relu gain) convs, BatchNorm scale 1 / bias 0, running
  mean 0 / var 1, as torchvision. Same distributions as `convert --weights random --seed N`, but
  different values: they are drawn from `jax.random.key(seed, impl="rbg")` (XLA's
  RngBitGenerator, which compiles in seconds where threefry takes ~10 s for a ResNet; values are
  deterministic per seed on one backend and may differ between CPU, GPU and TPU).
  """
  return _jitted_init(name)(jax.random.key(seed, impl="rbg"))


def load_variables(name: str, weights: str, *, seed: int = 0,
                   cache_dir: str | None = None) -> Variables:
  """The backbone's variables {'params': ..., 'batch_stats': ...}, for all its levels.

  Args:
    name: a backbone of `names()`.
    weights: a torchvision weight id converted earlier with `python -m pbas_jax.convert` (e.g.
      "IMAGENET1K_V1"), or "random".
    seed: seed of "random" weights.
    cache_dir: where converted files live; None = $PBAS_JAX_CACHE or ~/.cache/pbas_jax.

  "random" loads the file `convert --weights random --seed <seed>` wrote when it exists (torch's
  values, as the parity tests use); otherwise it falls back to `init_variables(name, seed)`, which
  needs no torch and has the same distributions but different values. Which one was used is
  logged.

  Raises:
    WeightsNotFoundError: a named weight id has no converted file (the message gives the command).
    CorruptWeightsError: the file or its sidecar is unreadable, fails its sha256, or its keys or
      shapes do not match the backbone.
  """
  path = weights_lib.weights_path(name, weights, seed=seed, cache_dir=cache_dir)
  if weights == "random" and not path.exists():
    logging.info("Backbone %s: no %s; using JAX-side random init (seed %d).", name, path, seed)
    return init_variables(name, seed)
  if weights != "random" and not path.exists() and spec(name).ensure_converted is not None:
    spec(name).ensure_converted(weights, cache_dir=cache_dir)
  return weights_lib.read_variables(path, variable_shapes(name),
                                    command=weights_lib.convert_command(name, weights, seed,
                                                                       cache_dir))
