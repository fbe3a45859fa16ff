r"""Seconds per training epoch: pbas_jax on cached features, and the reference's epoch, measured.

  python benchmarks/epoch.py [--root $PBAS_DATA/mpdd] [--class_name metal_plate] [--images N]
      [--image_size 288] [--epochs 3] [--runs R] [--compute_dtype bfloat16] [--reference_epochs 1]

The published settings by default (288x288, batch 8, WideResNet50 layers 2+3, 1536 dims) on one
class's training images, with random backbone weights (speed does not depend on their values; see
side_by_side.py for how both sides get the same ones).

pbas_jax: the features are extracted once (timed on its own, after compiling), the ABL centers
built, then `--epochs` epochs are timed after a first one that compiles; the median is reported.
`--runs` and `--compute_dtype` set the main job's `train.num_runs` and `train.compute_dtype`.

Reference (when torch is installed, in this process, on the same images, after pbas_jax): every
batch runs the whole torchvision forward (layer4 and fc included), the patch aggregation and the
train step, as the authors' `_train_discriminator` does (benchmarks/torch_reference.py), from the
same initial heads and center as pbas_jax's run 0. One warm-up step, then `--reference_epochs`
epochs; the median is reported. The ratio compares R reference epochs (the reference trains one
run per process) with one pbas_jax epoch of R runs. Image decoding is left out on both sides.

Then, on the same features and in this process (skipped with `--runs_sweep ''`):
  engine vs plain  one run (R = 1): the engine's epoch (one per call), the same with the
                   per-epoch progress callback on (`Trainer(on_epoch=...)`, as the main job runs
                   it), and a Python loop over the jitted plain `train.make_train_step` (the code
                   before the engine), calls interleaved so that all three see the same load;
                   the medians of `--epochs` each after one that compiles, and their ratios
  per run          the engine's epoch of R runs trained together for each R of `--runs_sweep`
                   (default 1,2,4,8), one epoch after one that compiles, divided by R
For a quick run: `--images 16 --image_size 64 --epochs 2 --no_reference`.

Prints `uptime` at the start and the end, the figures, and one JSON line last.
"""
import argparse
import time

import jax
import numpy as np

import side_by_side
from dispatch import loop_epoch
from pbas_jax import engine
from pbas_jax import features as features_lib
from pbas_jax import sharding
from pbas_jax import train


def pbas_jax_engine(config, features, mesh):
  """pbas_jax's training on cached features (N, H, W, D) as the main job runs it: the engine's
  `train.num_runs` runs trained together, one epoch per call.

  Returns:
    (states, epoch_fn, run0): the stacked initial states (ABL centers built), `epoch_fn(states,
    epoch) -> states` that trains one epoch (donating `states`) and returns once its metrics are
    on the host, and run 0's initial (params, center) as numpy arrays for the reference side.
  """
  runs = engine.runs_of(config)
  mesh = engine.mesh_of(config, mesh.devices.flatten())
  states = engine.init_states(config, runs, features, mesh)
  run0 = jax.device_get(jax.tree.map(lambda x: x[0], (states.params, states.center)))
  trainer = engine.Trainer(config, runs, mesh)

  def epoch_fn(states, epoch):
    return trainer.train(states, features, epoch, 1)[0]

  return states, epoch_fn, run0


def engine_vs_plain(config, features, mesh, epochs: int) -> dict:
  """Seconds per epoch of one run (R = 1): the engine, the engine with its progress callback, and
  a Python loop over the jitted plain step, interleaved; medians after one compiling epoch."""
  config = config.copy_and_resolve_references()
  config.train.num_runs, config.train.k_values = 1, ()
  runs = engine.runs_of(config)
  mesh = engine.mesh_of(config, mesh.devices.flatten())
  reported = []
  trainers = {"engine": engine.Trainer(config, runs, mesh),
              "engine_progress": engine.Trainer(config, runs, mesh,
                                                on_epoch=lambda e, m: reported.append(e))}
  states = {name: engine.init_states(config, runs, features, mesh) for name in trainers}
  plain = jax.jit(train.make_train_step(config), donate_argnums=0)
  state = engine.unstack(engine.init_states(config, runs, features, mesh))[0]
  key = engine.run_keys(runs[0].seed)[2]
  times = {name: [] for name in (*trainers, "plain")}
  for epoch in range(epochs + 1):  # epoch 0 compiles
    for name, trainer in trainers.items():
      t = time.perf_counter()
      states[name] = trainer.train(states[name], features, epoch, 1)[0]
      times[name].append(time.perf_counter() - t)
    t = time.perf_counter()
    state = loop_epoch(plain, state, features, jax.random.fold_in(key, epoch),
                       config.dataset.batch_size)
    jax.block_until_ready(state)
    times["plain"].append(time.perf_counter() - t)
  assert reported == list(range(1, epochs + 2)), reported
  return {name: side_by_side.median(t[1:]) for name, t in times.items()}


def per_run_epochs(config, features, mesh, runs_sweep: list[int]) -> dict:
  """Seconds per run of one epoch of R runs trained together, for each R (after compiling)."""
  out = {}
  for r in runs_sweep:
    config = config.copy_and_resolve_references()
    config.train.num_runs, config.train.k_values = r, ()
    states, epoch_fn, _ = pbas_jax_engine(config, features, mesh)
    states = epoch_fn(states, 0)  # compiles
    t = time.perf_counter()
    states = epoch_fn(states, 1)
    out[r] = (time.perf_counter() - t) / r
    del states
  return out


def reference_epochs(reference, run0, images: np.ndarray, config, epochs: int, device: str
                     ) -> tuple[list[float], float]:
  """Seconds of each of the reference's `epochs` epochs (after one warm-up step), and how far its
  first batch's patch features are from pbas_jax's (relative), which checks the inputs agree."""
  import torch_reference  # pylint: disable=g-import-not-at-top  (needs torch)
  b, bs = config.backbone, config.dataset.batch_size
  params, center = run0
  heads = torch_reference.Heads(params, center, config.model.k, lr=config.optim.lr,
                                proj_weight_decay=config.optim.proj_weight_decay,
                                dsc_lr=config.optim.dsc_lr,
                                dsc_weight_decay=config.optim.dsc_weight_decay, device=device)
  torch_images = side_by_side.to_torch(images, device)

  def features(batch):
    return torch_reference.patch_features(reference(batch), b.patch_size, b.pretrain_dim,
                                          b.target_dim)

  first = features(torch_images[:bs])
  heads.step(first)  # warm-up (allocator, kernels)
  times = []
  for epoch in range(epochs):
    order = np.random.default_rng(epoch).permutation(len(images))  # the shuffling loader
    side_by_side.sync(device)
    t = time.perf_counter()
    for start in range(0, len(order), bs):
      heads.step(features(torch_images[order[start:start + bs]]))
    side_by_side.sync(device)
    times.append(time.perf_counter() - t)
  return times, first.cpu().numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  side_by_side.add_args(parser)
  parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one that compiles")
  parser.add_argument("--runs", type=int, default=1, help="train.num_runs")
  parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="train.compute_dtype")
  parser.add_argument("--reference_epochs", type=int, default=1)
  parser.add_argument("--runs_sweep", default="1,2,4,8",
                      help="R values of the per-run row; '' skips it and the engine vs plain row")
  args = parser.parse_args()
  load_start = side_by_side.load()
  print(f"start: {load_start}")

  config = side_by_side.config_from(args)
  config.train.num_runs = args.runs
  config.train.compute_dtype = args.compute_dtype
  with_reference = side_by_side.reference_wanted(args)
  images, _ = side_by_side.load_images(args, "train")
  n, bs = len(images), args.batch_size
  steps = -(-n // bs)

  variables, reference, device = side_by_side.backbone(args, with_reference)
  b = config.backbone
  mesh = sharding.make_mesh()
  extractor = features_lib.make_extractor(b.name, variables, tuple(b.layers), b.patch_size,
                                          b.pretrain_dim, b.target_dim, mesh=mesh)
  side_by_side.extract(extractor, images[:bs], bs)  # compiles
  t = time.perf_counter()
  features = side_by_side.extract(extractor, images, bs)
  extract_s = time.perf_counter() - t

  t = time.perf_counter()
  state, epoch_fn, run0 = pbas_jax_engine(config, features, mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  times = []
  for epoch in range(args.epochs + 1):  # the first epoch compiles (full and partial batch)
    t = time.perf_counter()
    state = epoch_fn(state, epoch)
    times.append(time.perf_counter() - t)
  epoch_s = side_by_side.median(times[1:])

  result = {
      "benchmark": "epoch", "backend": jax.default_backend(), "device": str(jax.devices()[0]),
      "dataset": args.dataset, "class": args.class_name, "images": n,
      "image_size": args.image_size, "backbone": b.name, "layers": list(b.layers),
      "dims": b.target_dim, "batch_size": bs, "steps_per_epoch": steps, "runs": args.runs,
      "compute_dtype": config.train.compute_dtype, "devices": jax.device_count(),
      "extraction_s": round(extract_s, 3), "extraction_images_per_s": round(n / extract_s, 2),
      "init_s_with_compile": round(init_s, 2), "first_epoch_s_with_compile": round(times[0], 2),
      "epoch_s": round(epoch_s, 4), "epoch_s_all": [round(x, 4) for x in times[1:]],
      "reference": None,
  }
  print(f"pbas_jax: extraction {extract_s:.2f} s ({n} images, once), centers {init_s:.1f} s, "
        f"epoch {epoch_s:.3f} s ({args.runs} run(s), {steps} steps each)")
  if args.runs_sweep:
    versus = engine_vs_plain(config, features, mesh, args.epochs)
    result["one_run"] = {name: round(x, 4) for name, x in versus.items()}
    result["engine_over_plain"] = round(versus["engine"] / versus["plain"], 3)
    result["progress_over_engine"] = round(versus["engine_progress"] / versus["engine"], 3)
    print(f"one run, interleaved: engine {versus['engine']:.3f} s, engine with per-epoch "
          f"progress {versus['engine_progress']:.3f} s, Python loop over the jitted plain step "
          f"{versus['plain']:.3f} s per epoch; engine / plain = {result['engine_over_plain']}, "
          f"progress on / off = {result['progress_over_engine']}")
    per_run = per_run_epochs(config, features, mesh, [int(r) for r in args.runs_sweep.split(",")])
    result["per_run_epoch_s"] = {str(r): round(x, 4) for r, x in per_run.items()}
    print("per-run epoch, R runs together: " + ", ".join(
        f"R = {r}: {x:.3f} s" for r, x in per_run.items()))
  if with_reference:
    ref_times, ref_first = reference_epochs(reference, run0, images, config,
                                            args.reference_epochs, device)
    ref_s = side_by_side.median(ref_times)
    result["reference"] = {
        "epoch_s": round(ref_s, 3), "epoch_s_all": [round(x, 3) for x in ref_times],
        **side_by_side.torch_setting(device),
        "features_relative_difference": side_by_side.relative_difference(
            features[:bs], ref_first)}
    result["speedup"] = round(args.runs * ref_s / epoch_s, 2)
    print(f"reference (torch, {device}): epoch {ref_s:.2f} s, backbone every step; features "
          f"agree to {result['reference']['features_relative_difference']:.1e} relative")
    print(f"ratio: {args.runs} reference epoch(s) / one pbas_jax epoch of {args.runs} run(s) = "
          f"{result['speedup']}x")
  side_by_side.finish(result, args, load_start)


if __name__ == "__main__":
  main()
