r"""Seconds per training epoch on cached features, and the one-time feature extraction.

  python benchmarks/epoch.py --root ../shared/data/mpdd --class_name metal_plate

The published settings (288x288, batch 8, WideResNet50 layers 2+3, 1536 dims) on one class; the
backbone has random weights (speed does not depend on their values). The reference recomputes the
backbone every step: about 9.4 s per step of 8 images on a 2-core CPU, ~66 s per 54-image epoch.
Prints one JSON line last.
"""
import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

import mpdd_args
from pbas_jax import backbones
from pbas_jax import center as center_lib
from pbas_jax import config_base
from pbas_jax import data
from pbas_jax import experiment
from pbas_jax import features as features_lib
from pbas_jax import train


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  mpdd_args.add_mpdd_args(parser)
  parser.add_argument("--dataset", default="mpdd")
  parser.add_argument("--image_size", type=int, default=288)
  parser.add_argument("--backbone", default="wide_resnet50_2")
  parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up")
  args = parser.parse_args()

  config = config_base.base_config()
  config.dataset.name = args.dataset
  config.dataset.image_size = config.dataset.resize = args.image_size
  config.backbone.name = args.backbone
  source = data.load_split(args.dataset, args.root, args.class_name, "train",
                           data_dir=os.path.join(tempfile.gettempdir(), "pbas_bench_tfds"),
                           image_size=args.image_size, resize=args.image_size)
  variables = backbones.load_variables(args.backbone, "random", seed=0)
  extractor = features_lib.make_extractor(args.backbone, variables, tuple(config.backbone.layers))

  # Warm the extractor's compilation on one batch so the extraction figure is steady-state work.
  jax.block_until_ready(extractor(next(data.batches(source, config.eval.batch_size))["image"]))
  t = time.perf_counter()
  split = experiment.extract_split(extractor, source, config, np.zeros(0, int), "features")
  jax.block_until_ready(split.features)
  extract_s = time.perf_counter() - t

  state = train.create_train_state(config, jax.random.key(0), split.features.shape[-1])
  t = time.perf_counter()
  state = state.replace(center=center_lib.init_center(
      state.project, experiment.center_batches(split.features, jax.random.key(1), 8)))
  jax.block_until_ready(state.center)
  center_s = time.perf_counter() - t

  step_fn = train.make_jit_train_step(config)
  times = []
  for epoch in range(args.epochs + 1):  # the first epoch compiles (full and partial batch)
    t = time.perf_counter()
    state, metrics = train.train_epoch(step_fn, state, split.features, jax.random.key(epoch), 8)
    times.append(time.perf_counter() - t)
  epoch_s = float(np.median(times[1:]))
  n = split.features.shape[0]
  steps = -(-n // 8)
  result = {
      "benchmark": "epoch", "backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "dataset": args.dataset, "class": args.class_name, "images": n,
      "image_size": args.image_size, "backbone": args.backbone, "batch_size": 8,
      "extraction_s": round(extract_s, 2), "extraction_images_per_s": round(n / extract_s, 2),
      "center_init_s": round(center_s, 2), "first_epoch_s_with_compile": round(times[0], 2),
      "epoch_s_median": round(epoch_s, 3), "step_s": round(epoch_s / steps, 3),
      "reference_epoch_s": 66.0, "speedup_vs_reference_epoch": round(66.0 / epoch_s, 1),
      "final_loss": round(metrics["loss"], 4),
  }
  print(f"extraction {extract_s:.1f} s ({n} images), center {center_s:.1f} s, "
        f"epoch {epoch_s:.2f} s ({steps} steps; reference ~66 s)")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
