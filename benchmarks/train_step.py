"""Speed of the jitted PBAS train step at the published size: batch 8 at 288x288.

That is 8 x 36 x 36 = 10368 patches of 1536 dims against 1296 centers. Prints the median seconds per
step and the achieved GFLOP/s (XLA's count of the compiled step), then one JSON line.

  python benchmarks/train_step.py [--steps 10] [--batch 8] [--grid 36] [--dim 1536]

When torch is installed, the reference's step (its training part only, re-stated op for op in
benchmarks/torch_reference.py) is timed in this process on the same features, from the same
initial heads and center, and the ratio printed; without torch, pbas_jax's figures only.
"""
import argparse
import importlib.util
import json
import statistics
import time

import numpy as np

import jax
import jax.numpy as jnp

from pbas_jax import config_base
from pbas_jax import engine
from pbas_jax import sharding
from pbas_jax import train


def reference_flops(patches: int, centers: int, dim: int, hidden: int) -> float:
  """Matmul FLOPs of the reference's step (torch autograd on the concatenated batch)."""
  proj = 2 * patches * dim * dim * 2            # forward + weight gradient
  match = 2 * patches * centers * dim           # cosine similarities
  disc = 2 * (2 * patches) * dim * hidden * 3   # forward, weight and input gradients
  return float(proj + match + disc)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--grid", type=int, default=36)
  parser.add_argument("--dim", type=int, default=1536)
  args = parser.parse_args()

  config = config_base.base_config()
  config.dataset.batch_size = args.batch
  key_feat, key_step = jax.random.split(jax.random.key(0))
  shape = (args.batch, args.grid, args.grid, args.dim)
  features = jax.random.normal(key_feat, shape, jnp.float32)
  # The center bank as the main job builds it (ABL over two batches of these features).
  mesh = sharding.make_mesh()
  states = engine.init_states(config, engine.runs_of(config),
                              jnp.concatenate([features, features[::-1] * 0.5 + 0.1]), mesh)
  state = engine.unstack(states)[0]
  initial = jax.device_get((state.params, state.center))  # the step donates the state

  step = jax.jit(train.make_train_step(config), donate_argnums=0)
  compiled = step.lower(state, features, key_step).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))

  state, metrics = step(state, features, key_step)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, features, key_step)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)

  median = statistics.median(times)
  patches = args.batch * args.grid * args.grid
  ref = reference_flops(patches, args.grid * args.grid, args.dim, config.model.disc_hidden)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
  print(f"step times (s): {' '.join(f'{t:.3f}' for t in times)}")
  print(f"median {median:.3f} s/step; XLA flops {flops / 1e9:.1f} G -> {flops / median / 1e9:.1f} "
        f"GFLOP/s; reference-equivalent {ref / 1e9:.1f} GFLOP -> {ref / median / 1e9:.1f} GFLOP/s")
  result = {"benchmark": "train_step", "batch": args.batch, "grid": args.grid,
            "dim": args.dim, "centers": args.grid * args.grid, "steps": args.steps,
            "median_s": round(median, 4), "min_s": round(min(times), 4),
            "xla_gflop": round(flops / 1e9, 2),
            "gflops_per_s": round(flops / median / 1e9, 2),
            "reference_gflop": round(ref / 1e9, 2),
            "reference_equivalent_gflops_per_s": round(ref / median / 1e9, 2),
            "loss": float(metrics["loss"]),
            "device": jax.devices()[0].device_kind, "torch_median_s": None}
  if importlib.util.find_spec("torch") is not None:
    torch_s = torch_step_seconds(initial, np.asarray(features), config.model.k, args.steps)
    result.update(torch_median_s=round(torch_s, 4), speedup=round(torch_s / median, 2))
    print(f"reference step (torch, cpu, {args.steps} steps): median {torch_s:.3f} s/step -> "
          f"{torch_s / median:.2f}x")
  else:
    print("torch not installed: pbas_jax's figures only, no reference side")
  print(json.dumps(result))


def torch_step_seconds(initial, features: np.ndarray, k: float, steps: int) -> float:
  """Median seconds of the reference's step (torch_reference.Heads) after one warm-up step."""
  import torch  # pylint: disable=g-import-not-at-top  (convert extra)
  import torch_reference  # pylint: disable=g-import-not-at-top
  params, center = initial
  heads = torch_reference.Heads(params, center, k)
  batch = torch.tensor(features)
  heads.step(batch)  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    heads.step(batch)  # returns after .item(): the step has finished
    times.append(time.perf_counter() - start)
  return statistics.median(times)


if __name__ == "__main__":
  main()
