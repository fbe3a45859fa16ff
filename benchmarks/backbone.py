"""Feature extraction speed: backbone + patch features, batch 8 at 288x288 (wide_resnet50_2).

    python benchmarks/backbone.py [--arch wide_resnet50_2] [--batch 8] [--size 288] [--runs 5]

Times the jitted extractor (backbone + patch features) after a warm-up. When torch is installed,
both sides get the same random weights (torchvision's init after torch.manual_seed(0), converted
into the Flax variables) and the reference's extraction is timed on the same input in this
process: torchvision's full forward (layer4 and fc included, as the reference runs it every batch)
alone, and with the reference's patch aggregation (benchmarks/torch_reference.py); the features of
both sides are compared. Without torch, pbas_jax's own random init and its figures only. Prints
the median of `--runs` runs, `uptime`, and, last, one JSON line. The CPU may be shared: figures are
noisy.
"""
import argparse
import importlib.util
import json
import os
import statistics
import time

import jax
import numpy as np

import side_by_side
from pbas_jax import backbones
from pbas_jax import features


def _median_seconds(fn, runs: int) -> float:
  fn()  # warm-up (compilation, allocator)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--arch", default="wide_resnet50_2", choices=backbones.names())
  parser.add_argument("--layers", default="layer2,layer3")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=288)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="torch.set_num_threads (0 = torch's default)")
  args = parser.parse_args()

  images = np.random.default_rng(0).standard_normal(
      (args.batch, args.size, args.size, 3)).astype(np.float32)
  layers = tuple(args.layers.split(","))
  uptime = side_by_side.load()
  print(f"start: {uptime}")
  with_torch = importlib.util.find_spec("torch") is not None
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference  # pylint: disable=g-import-not-at-top
    from pbas_jax import convert  # pylint: disable=g-import-not-at-top
    if args.torch_threads > 0:
      torch.set_num_threads(args.torch_threads)
    model = convert.torch_model(args.arch, "random", seed=0)
    variables = convert.variables_from_torch(args.arch, model)
  else:
    variables = backbones.init_variables(args.arch, 0)
  extract = features.make_extractor(args.arch, variables, layers)
  jax_s = _median_seconds(lambda: jax.block_until_ready(extract(images)), args.runs)
  result = dict(arch=args.arch, batch=args.batch, size=args.size, cpus=os.cpu_count(),
                load_start=uptime, backend=jax.default_backend(),
                jax_s_per_batch=round(jax_s, 3), jax_images_per_s=round(args.batch / jax_s, 2))
  print(f"pbas_jax extractor: {jax_s:.3f} s/batch, {args.batch / jax_s:.2f} images/s")

  if with_torch:
    reference = torch_reference.Backbone(model, layers)
    batch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    forward_s = _median_seconds(lambda: reference(batch), args.runs)
    embed = lambda: torch_reference.patch_features(reference(batch))  # noqa: E731
    torch_s = _median_seconds(embed, args.runs)
    result.update(torch_threads=torch.get_num_threads(),
                  torch_forward_s_per_batch=round(forward_s, 3),
                  torch_s_per_batch=round(torch_s, 3),
                  torch_images_per_s=round(args.batch / torch_s, 2),
                  speedup=round(torch_s / jax_s, 2),
                  features_relative_difference=side_by_side.relative_difference(
                      extract(images), embed()))
    print(f"reference: torchvision full forward {forward_s:.3f} s/batch; with patch aggregation "
          f"{torch_s:.3f} s/batch, {args.batch / torch_s:.2f} images/s -> {torch_s / jax_s:.2f}x; "
          f"features agree to {result['features_relative_difference']:.1e} relative")
  else:
    print("torch not installed: pbas_jax's figures only, no reference side")
  result["load_end"] = side_by_side.load()
  print(f"end: {result['load_end']}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
