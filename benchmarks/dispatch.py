r"""Dispatch overhead: the scanned engine's epoch vs a Python loop over the jitted step.

  python benchmarks/dispatch.py [--images 256] [--grid 4] [--dim 64] [--hidden 64] [--epochs 5]
      [--epochs_per_call 10]

A tiny setting where dispatch dominates (default: 256 images of 4x4 patches of 64 dims, as a
32 px input at stride 8 would give; random features; batch 8, so 32 steps per epoch). Both sides
train the same run (seed 0, same initial state, the same orders and step keys from
`engine.epoch_plan`) and are timed after compiling, in this process:
  engine      `engine.Trainer.train`, one epoch per call (the whole epoch one program), and
              `--epochs_per_call` epochs per call (as the main job runs between evaluations),
              `--epochs` calls of each
  loop        per step from Python: gather the batch, call `jax.jit(train.make_train_step(config))`
              (state donated), metrics fetched once at the end of the epoch
Prints the median seconds per epoch of each, the loop / engine ratios, `uptime` at the start and
the end, and one JSON line last. Both sides end with the same parameters to float32 rounding
(printed; D's pre-BatchNorm bias apart, which Adam moves on noise).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import side_by_side
from pbas_jax import config_base
from pbas_jax import engine
from pbas_jax import sharding
from pbas_jax import train


def loop_epoch(step, state, features, key, batch_size: int):
  """One epoch as a Python loop over the jitted step, in `engine.epoch_plan`'s order."""
  perm, keys = engine.epoch_plan(key, features.shape[0], batch_size)
  metrics = []
  for i in range(keys.shape[0]):
    state, m = step(state, features[perm[i * batch_size:(i + 1) * batch_size]], keys[i])
    metrics.append(m)
  jax.device_get(metrics)  # once per epoch, as the engine fetches its metrics
  return state


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--grid", type=int, default=4, help="patches per side (32 px / stride 8)")
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=64, help="model.disc_hidden")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=5, help="timed epochs per side")
  parser.add_argument("--epochs_per_call", type=int, default=10)
  args = parser.parse_args()
  load_start = side_by_side.load()
  print(f"start: {load_start}")

  config = config_base.base_config()
  config.dataset.batch_size = args.batch_size
  config.model.disc_hidden = args.hidden
  mesh = sharding.make_mesh()
  runs = engine.runs_of(config)  # one run, seed 0
  features = jax.random.normal(jax.random.key(1), (args.images, args.grid, args.grid, args.dim))
  features = sharding.put(features, sharding.replicated(mesh))
  states = engine.init_states(config, runs, features, mesh)
  start_state = jax.device_get(engine.unstack(states)[0])
  trainer = engine.Trainer(config, runs, mesh)
  steps = -(-args.images // args.batch_size)

  # Engine, one epoch per call: epoch 0 compiles, then `--epochs` timed.
  times = []
  for epoch in range(args.epochs + 1):
    t = time.perf_counter()
    states, _ = trainer.train(states, features, epoch, 1)
    times.append(time.perf_counter() - t)
  engine_s = side_by_side.median(times[1:])
  engine_params = jax.device_get(engine.unstack(states)[0].params)
  # Engine, several epochs per call: the first call compiles for that count, then `--epochs`
  # calls timed.
  times, epoch = [], args.epochs + 1
  for _ in range(args.epochs + 1):
    t = time.perf_counter()
    states, _ = trainer.train(states, features, epoch, args.epochs_per_call)
    times.append((time.perf_counter() - t) / args.epochs_per_call)
    epoch += args.epochs_per_call
  multi_s = side_by_side.median(times[1:])

  # Loop: the same run from the same start, the same epochs' orders and keys.
  step = jax.jit(train.make_train_step(config), donate_argnums=0)
  train_key = engine.run_keys(runs[0].seed)[2]
  state = jax.tree.map(jnp.asarray, start_state)
  times = []
  for epoch in range(args.epochs + 1):  # epoch 0 compiles (full and partial batch shapes)
    t = time.perf_counter()
    state = loop_epoch(step, state, features, jax.random.fold_in(train_key, epoch),
                       args.batch_size)
    times.append(time.perf_counter() - t)
  loop_s = side_by_side.median(times[1:])
  differences = {jax.tree_util.keystr(path): float(np.abs(a - b).max()) for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)),
      jax.tree.leaves(engine_params))}
  # D's pre-BatchNorm bias has a true gradient of exactly 0 (BatchNorm removes any shift): Adam
  # steps on float32 noise there, which differs between two compilations (test_train_step.py).
  noise = differences.pop("['discriminator']['block0_linear']['bias']")
  difference = max(differences.values())

  result = {
      "benchmark": "dispatch", "backend": jax.default_backend(), "devices": jax.device_count(),
      "images": args.images, "grid": args.grid, "dim": args.dim, "hidden": args.hidden,
      "batch_size": args.batch_size, "steps_per_epoch": steps, "epochs": args.epochs,
      "engine_epoch_s": round(engine_s, 5), "engine_epoch_s_multi": round(multi_s, 5),
      "epochs_per_call": args.epochs_per_call, "loop_epoch_s": round(loop_s, 5),
      "loop_over_engine": round(loop_s / engine_s, 2),
      "loop_over_engine_multi": round(loop_s / multi_s, 2),
      "max_param_difference": difference, "pre_bn_bias_difference": noise,
  }
  print(f"{steps} steps per epoch ({args.images} images of {args.grid}x{args.grid}x{args.dim}, "
        f"batch {args.batch_size}):")
  print(f"  engine, 1 epoch per call:   {engine_s * 1e3:8.2f} ms/epoch")
  print(f"  engine, {args.epochs_per_call} epochs per call: {multi_s * 1e3:8.2f} ms/epoch")
  print(f"  Python loop over the jitted step: {loop_s * 1e3:8.2f} ms/epoch "
        f"({loop_s / steps * 1e3:.2f} ms/step)")
  print(f"ratio loop / engine: {result['loop_over_engine']}x (1 epoch per call), "
        f"{result['loop_over_engine_multi']}x ({args.epochs_per_call} per call); parameters after "
        f"{args.epochs + 1} epochs differ by {difference:.1e} (D's pre-BatchNorm bias, "
        f"whose true gradient is 0, by {noise:.1e})")
  side_by_side.finish(result, args, load_start)


if __name__ == "__main__":
  main()
