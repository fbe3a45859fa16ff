r"""R runs of one class vmapped in one program vs the same R runs one after another.

  python benchmarks/multirun.py --root ../shared/data/mpdd --class_name metal_plate --runs 4

The smoke setting (configs/mpdd.py:smoke: 64 px, WideResNet50 with random weights, 256 dims) on
one class, features extracted once and shared. Sequential: `experiment.train_class` for seeds
0..R-1 (each compiles its step, as separate runs do). Together: `experiment.train_runs` with the R
runs (one compilation, one pass of steps). Both include the R center inits and a checkpoint at the
end. Also the steady-state epoch (after compilation): one run's vs the R runs' together. Without
the MPDD class, the embedded demo class `brushed_metal` stands in. Prints one JSON line last.
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
from pbas_jax import config_base
from pbas_jax import data
from pbas_jax import experiment
from pbas_jax import features as features_lib
from pbas_jax import multirun
from pbas_jax import sharding
from pbas_jax import train
from pbas_jax.data import demo as demo_data


def smoke_config(args, workdir):
  config = config_base.load(os.path.join(os.path.dirname(__file__), "..", "configs",
                                         "mpdd.py:smoke"))
  if os.path.isdir(os.path.join(args.root, args.class_name)):
    config.dataset.root, config.dataset.classes = args.root, args.class_name
  else:
    print(f"{args.root}/{args.class_name} not found: using the demo class brushed_metal")
    config.dataset.name, config.dataset.classes = "demo", "brushed_metal"
    config.dataset.root = os.path.join(workdir, "demo")
    demo_data.make_demo_dataset(config.dataset.root)
  config.dataset.data_dir = os.path.join(tempfile.gettempdir(), "pbas_bench_tfds")
  config.train.epochs = args.epochs
  config.train.checkpoint_every = args.epochs
  config.eval.heatmaps = 0
  return config


def timed(fn, *args):
  t = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(jax.tree.leaves(out))
  return out, time.perf_counter() - t


def steady_epoch_s(epoch_fn, state, epochs: int) -> float:
  """Median seconds of `epochs` epochs after a first (compiling) one."""
  state, _ = epoch_fn(state, 0)
  times = []
  for epoch in range(1, epochs + 1):
    (state, _), seconds = timed(epoch_fn, state, epoch)
    times.append(seconds)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  mpdd_args.add_mpdd_args(parser)
  parser.add_argument("--runs", type=int, default=4)
  parser.add_argument("--epochs", type=int, default=3, help="epochs per run (smoke: 3)")
  parser.add_argument("--steady_epochs", type=int, default=5)
  args = parser.parse_args()

  workdir = tempfile.mkdtemp(prefix="pbas_multirun_")
  config = smoke_config(args, workdir)
  class_name = config.dataset.classes
  mesh = sharding.make_mesh()
  variables = backbones.load_variables(config.backbone.name, "random", seed=0)
  extractor = features_lib.make_extractor(
      config.backbone.name, variables, tuple(config.backbone.layers), config.backbone.patch_size,
      config.backbone.pretrain_dim, config.backbone.target_dim, mesh=mesh)
  builder, root = experiment.source_of(config)
  source = data.load_split(builder, root, class_name, "train", data_dir=config.dataset.data_dir,
                           image_size=config.dataset.image_size, resize=config.dataset.resize)
  split, extract_s = timed(experiment.extract_split, extractor, source, config, np.zeros(0, int),
                           "train features")
  features = split.features
  # Compile the center init's shared pieces once, so neither mode is charged for them.
  experiment.init_state(config, features, seed=0)

  sequential_s = 0.0
  for seed in range(args.runs):
    config.train.seed = seed
    _, seconds = timed(experiment.train_class, config, os.path.join(workdir, f"alone{seed}"),
                       split, None, mesh)
    sequential_s += seconds
  config.train.seed, config.train.num_runs = 0, args.runs
  runs = multirun.runs_of(config)
  _, together_s = timed(experiment.train_runs, config, os.path.join(workdir, "together"), split,
                        None, runs, mesh)

  features = sharding.put(features, sharding.replicated(mesh))
  bs = config.dataset.batch_size
  one_step = train.make_jit_train_step(config, mesh)
  one_epoch = lambda state, e: train.train_epoch(one_step, state, features, jax.random.key(e), bs)
  many_step = multirun.make_multirun_step(config, mesh)
  hparams = multirun.hparams_of(runs)
  many_epoch = lambda states, e: multirun.train_epoch(
      many_step, states, features, jax.random.split(jax.random.key(e), len(runs)), bs, hparams)
  states = [experiment.init_state(config, features, run.seed) for run in runs]
  many_s = steady_epoch_s(many_epoch, multirun.stack(states), args.steady_epochs)
  one_s = steady_epoch_s(one_epoch, states[0], args.steady_epochs)  # donates states[0]

  n = features.shape[0]
  result = {
      "benchmark": "multirun", "backend": jax.default_backend(), "devices": jax.device_count(),
      "dataset": config.dataset.name, "class": class_name, "images": n,
      "image_size": config.dataset.image_size, "backbone": config.backbone.name,
      "feature_shape": list(features.shape[1:]), "runs": args.runs, "epochs": args.epochs,
      "steps_per_epoch": -(-n // bs), "extraction_s": round(extract_s, 2),
      "sequential_train_s": round(sequential_s, 2), "together_train_s": round(together_s, 2),
      "speedup": round(sequential_s / together_s, 2),
      "epoch_s_one_run": round(one_s, 4), "epoch_s_runs_together": round(many_s, 4),
      "steady_speedup": round(args.runs * one_s / many_s, 2),
  }
  print(f"{args.runs} runs x {args.epochs} epochs on {n} images: sequential {sequential_s:.1f} s, "
        f"together {together_s:.1f} s ({result['speedup']}x); steady epoch: one run {one_s:.3f} s, "
        f"{args.runs} together {many_s:.3f} s ({result['steady_speedup']}x); features extracted "
        f"once in {extract_s:.1f} s (separate jobs would extract {args.runs} times)")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
