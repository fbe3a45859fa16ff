"""Feature extraction speed: backbone + patch features, batch 8 at 288x288 (wide_resnet50_2).

    python benchmarks/backbone.py [--arch wide_resnet50_2] [--batch 8] [--size 288] [--runs 5]

Times the jitted extractor (random weights: speed does not depend on values) after a warm-up,
and, when torch is installed, torchvision's full forward (layer4 and fc included, as the
reference runs it every batch) on the same input with torch.set_num_threads = CPU count. Prints
the median of `--runs` runs and, last, one JSON line. The CPU may be shared: figures are noisy.
"""
import argparse
import importlib.util
import json
import os
import statistics
import time

import jax
import numpy as np

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
  args = parser.parse_args()

  images = np.random.default_rng(0).standard_normal(
      (args.batch, args.size, args.size, 3)).astype(np.float32)
  layers = tuple(args.layers.split(","))
  extract = features.make_extractor(args.arch, backbones.init_variables(args.arch, 0), layers)
  jax_s = _median_seconds(lambda: jax.block_until_ready(extract(images)), args.runs)
  result = dict(arch=args.arch, batch=args.batch, size=args.size, cpus=os.cpu_count(),
                load_avg_1min=round(os.getloadavg()[0], 2), backend=jax.default_backend(), jax_s_per_batch=round(jax_s, 3),
                jax_images_per_s=round(args.batch / jax_s, 2))
  print(f"pbas_jax extractor: {jax_s:.3f} s/batch, {args.batch / jax_s:.2f} images/s")

  if importlib.util.find_spec("torch") is not None:
    import torch  # pylint: disable=g-import-not-at-top
    from pbas_jax import convert  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
    model = convert.torch_model(args.arch, "random")
    batch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
      torch_s = _median_seconds(lambda: model(batch), args.runs)
    result.update(torch_s_per_batch=round(torch_s, 3),
                  torch_images_per_s=round(args.batch / torch_s, 2))
    print(f"torchvision full forward: {torch_s:.3f} s/batch, {args.batch / torch_s:.2f} images/s")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
