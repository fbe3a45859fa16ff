"""What epoch.py and inference.py share: the inputs both sides get, the backbone, timing helpers.

Both sides see the same preprocessed images (decoded once, so neither is charged for decoding)
and the same backbone function: with torch installed, torchvision's random init after
`torch.manual_seed(0)`, converted into the Flax variables (`convert.variables_from_torch`); the
reference side runs that torch model. Without torch, pbas_jax's own random init and no reference.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import mpdd_args
from pbas_jax import backbones
from pbas_jax import config_base
from pbas_jax import data


def add_args(parser: argparse.ArgumentParser) -> None:
  """The flags of the side-by-side benchmarks (the MPDD class, size, backbone, batch)."""
  mpdd_args.add_mpdd_args(parser)
  parser.add_argument("--dataset", default="mpdd")
  parser.add_argument("--images", type=int, default=0, help="use the first N images (0 = all)")
  parser.add_argument("--image_size", type=int, default=288)
  parser.add_argument("--backbone", default="wide_resnet50_2",
                      help="a torchvision ResNet for the reference side")
  parser.add_argument("--layers", default="layer2,layer3")
  parser.add_argument("--batch_size", type=int, default=8, help="images per step, both sides")
  parser.add_argument("--no_reference", action="store_true",
                      help="skip the reference side even when torch is installed")
  parser.add_argument("--torch_device", default=None,
                      help="device of the reference side (default: cuda when JAX runs on a GPU "
                           "and torch sees one, else cpu)")
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="torch.set_num_threads on cpu (0 = torch's default). On a loaded "
                           "machine, 1 can beat 2: OpenMP threads spin waiting for each other")


def config_from(args) -> ml_collections.ConfigDict:
  """The main job's config with the benchmark's dataset, size, backbone and batch."""
  config = config_base.base_config()
  config.dataset.name = args.dataset
  config.dataset.image_size = config.dataset.resize = args.image_size
  config.dataset.batch_size = config.eval.batch_size = args.batch_size
  config.backbone.name = args.backbone
  config.backbone.weights = "random"
  config.backbone.layers = tuple(args.layers.split(","))
  return config


def load() -> str:
  """`uptime`'s line (the load of the machine the figures were measured on)."""
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def load_images(args, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The first `--images` preprocessed images (N, S, S, 3) of `split`, and their labels (N,)."""
  source = data.load_split(args.dataset, args.root, args.class_name, split,
                           data_dir=os.path.join(tempfile.gettempdir(), "pbas_bench_tfds"),
                           image_size=args.image_size, resize=args.image_size)
  n = len(source) if args.images <= 0 else min(args.images, len(source))
  images, labels = [], []
  for batch in data.batches(source, 16, indices=np.arange(n)):
    valid = batch["valid"]
    images.append(batch["image"][valid])
    labels.append(batch["label"][valid])
  return np.concatenate(images), np.concatenate(labels)


def reference_wanted(args) -> bool:
  """Whether the reference side runs: torch installed and not `--no_reference`."""
  return not args.no_reference and importlib.util.find_spec("torch") is not None


def backbone(args, with_reference: bool):
  """(Flax variables, torch reference backbone or None, torch device or None)."""
  if not with_reference:
    return backbones.init_variables(args.backbone, 0), None, None
  import torch  # pylint: disable=g-import-not-at-top  (convert extra)
  import torch_reference  # pylint: disable=g-import-not-at-top
  from pbas_jax import convert  # pylint: disable=g-import-not-at-top
  device = args.torch_device or ("cuda" if jax.default_backend() == "gpu"
                                 and torch.cuda.is_available() else "cpu")
  if args.torch_threads > 0:
    torch.set_num_threads(args.torch_threads)
  model = convert.torch_model(args.backbone, "random", seed=0)
  variables = convert.variables_from_torch(args.backbone, model)
  return variables, torch_reference.Backbone(model.to(device), args.layers.split(",")), device


def finish(result: dict, args, load_start: str) -> None:
  """Says why there is no reference side (if none), adds the load at the start and the end to
  `result`, prints the end load and `result` as the JSON line last."""
  if result.get("reference") is None and hasattr(args, "no_reference"):
    why = "--no_reference" if args.no_reference else "torch not installed"
    print(f"{why}: pbas_jax's figures only, no reference side")
  result["load_start"], result["load_end"] = load_start, load()
  print(f"end: {result['load_end']}")
  print(json.dumps(result))


def torch_setting(device: str) -> dict:
  """Where and how the reference side ran, for the JSON line."""
  import torch  # pylint: disable=g-import-not-at-top
  return {"torch": torch.__version__, "torch_device": device,
          "torch_threads": torch.get_num_threads()}


def to_torch(images: np.ndarray, device: str):
  """(N, S, S, 3) numpy -> (N, 3, S, S) torch on `device`, as the reference's loader gives."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def sync(device: str | None) -> None:
  """Waits for the reference's queued work (a no-op on cpu)."""
  if device and device.startswith("cuda"):
    import torch  # pylint: disable=g-import-not-at-top
    torch.cuda.synchronize()


def padded_batches(images, batch_size: int):
  """(batch (B, ...), valid rows) in order; the last batch padded to B as `data.batches` does
  (one compiled shape). `images`: numpy, or a JAX array (padded on its device)."""
  xp = jnp if isinstance(images, jax.Array) else np
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    valid = len(batch)
    if valid < batch_size:
      batch = xp.concatenate([batch, xp.zeros((batch_size - valid,) + batch.shape[1:],
                                              batch.dtype)])
    yield batch, valid


def extract(extractor, images: np.ndarray, batch_size: int) -> jax.Array:
  """pbas_jax's patch features (N, H, W, D) of `images`, in fixed-shape batches, on device."""
  feats = [extractor(batch)[:valid] for batch, valid in padded_batches(images, batch_size)]
  return jax.block_until_ready(jnp.concatenate(feats))


def relative_difference(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|: how closely the two sides computed the same thing."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def median(times: list[float]) -> float:
  return float(statistics.median(times))
