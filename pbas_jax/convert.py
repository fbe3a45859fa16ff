"""torch backbone weights -> a Flax variables file that `backbones.load_variables` reads.

    python -m pbas_jax.convert --arch wide_resnet50_2 --weights IMAGENET1K_V1
    python -m pbas_jax.convert --arch resnet18 --weights random --seed 3 --cache_dir /tmp/w

Named weights are downloaded through torchvision (needs internet once; torch's hub cache keeps
the .pth). `random` converts torchvision's own random init after `torch.manual_seed(seed)`.
Packaged weights (efficientnet_lite0 `imagenet`) are converted as on first use, without torch.
Everything else needs the `convert` extra (torch, torchvision); torch is imported only when
converting. A `.safetensors` file needs none of this: give it as `backbone.weights`.
"""
import argparse
import os
from typing import Any, Sequence

from pbas_jax import backbones
from pbas_jax.backbones import weights as weights_lib


def torch_model(arch: str, weights: str, seed: int = 0):
  """The torch backbone in eval mode: `weights` id, or "random" initialized after manual_seed."""
  import torch  # pylint: disable=g-import-not-at-top  (convert extra only)
  if weights == "random":
    torch.manual_seed(seed)
  return backbones.spec(arch).torch_model(None if weights == "random" else weights)


def variables_from_torch(arch: str, model) -> dict[str, Any]:
  """Flax variables of `model` (a torch module of backbone `arch`), checked against the module."""
  state = {key: value.detach().cpu().numpy() for key, value in model.state_dict().items()}
  return backbones.from_torch_state(arch, state, where=f"Converting {arch}: the torch weights")


def _source(arch: str, weights: str, seed: int) -> str:
  """Where the values came from: torchvision's download URL when it knows the weights."""
  import torchvision  # pylint: disable=g-import-not-at-top
  if weights == "random":
    return f"torch.manual_seed({seed}), default init"
  try:
    return torchvision.models.get_model_weights(arch)[weights].url
  except (ValueError, KeyError):  # not a torchvision model or weight id
    return f"{arch} {weights}"


def convert(arch: str, weights: str, *, seed: int = 0,
            cache_dir: str | os.PathLike | None = None) -> str:
  """Converts and writes `weights_path(arch, weights, ...)`; returns that path."""
  if weights in backbones.spec(arch).packaged:
    return str(backbones.weights_file(arch, weights, cache_dir=cache_dir))
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  path = weights_lib.weights_path(arch, weights, seed=seed, cache_dir=cache_dir)
  variables = variables_from_torch(arch, torch_model(arch, weights, seed))
  meta = dict(backbone=arch, weights=weights, seed=seed if weights == "random" else None,
              source=_source(arch, weights, seed), torch=torch.__version__,
              torchvision=torchvision.__version__)
  weights_lib.save_variables(path, variables, meta)
  return str(path)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m pbas_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True, choices=backbones.names())
  parser.add_argument("--weights", required=True,
                      help="torchvision weight id (e.g. IMAGENET1K_V1), a packaged one "
                           "(efficientnet_lite0: imagenet) or 'random'")
  parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed of --weights random")
  parser.add_argument("--cache_dir", default=None,
                      help="output folder (default $PBAS_JAX_CACHE or ~/.cache/pbas_jax)")
  args = parser.parse_args(argv)
  print(convert(args.arch, args.weights, seed=args.seed, cache_dir=args.cache_dir))


if __name__ == "__main__":
  main()
