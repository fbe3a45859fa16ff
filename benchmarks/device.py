r"""One script for an accelerator: epoch, extraction and inference figures with compile times and
peak device memory, in under 8 minutes on one GPU.

  python benchmarks/device.py [--source auto|mpdd|random] [--runs 1,8]
      [--compute_dtypes float32,bfloat16] [--epochs 10] [--budget_s 420]
  python benchmarks/device.py --quick     # tiny sizes on CPU in about a minute (the test's run)

The paper's settings by default: WideResNet50 layers 2 + 3, 1536 dims, 288 px, batch 8, random
backbone weights (speed does not depend on their values). Images: MPDD metal_plate's preprocessed
train and test images when `--root` (default $PBAS_DATA/mpdd) holds the class (`--source auto`),
else random images of the same shape and count (54 train, 107 test, as the README's CPU figures).
In order, each after compiling, on `sharding.make_mesh()` (every device):

  extraction  the main job's extractor (`features.extractor_of`) over the train images, in
              batches of `--batch_size`; the median of `--repeats` passes after a first one
  epoch       for each R of `--runs` and each `train.compute_dtype` of `--compute_dtypes`: the
              engine as the main job runs it (`engine.init_states`, then `engine.Trainer.train`
              one epoch per call); `--epochs` timed calls after one that compiles, the median
  inference   extraction and scoring (`inference.predict`: scores and smoothed maps to the host)
              of the test images with the first run of R = 1 float32, as benchmarks/inference.py

Compile time is the sum of JAX's trace, lowering and backend-compile durations during a phase
(`jax.monitoring`). Peak memory is the largest `peak_bytes_in_use` over the local devices after a
phase: the allocator's peak since the process started (it cannot be reset), so a phase's own need
shows where the figure rises; 'n/a' where the backend reports none (CPU). Phases that would start
after `--budget_s` seconds are skipped and listed. Prints `uptime` at the start and the end and
one JSON line of all figures last. JAX's memory settings are left as they are (its default
preallocation does not change `peak_bytes_in_use`).
"""
import argparse
import os
import time

import jax
import numpy as np

import inference as inference_bench
import mpdd_args
import side_by_side
from pbas_jax import engine
from pbas_jax import features as features_lib
from pbas_jax import sharding

# The paper's settings, and tiny ones for a CPU check of the script (--quick).
FULL = dict(backbone="wide_resnet50_2", image_size=288, dims=1536, disc_hidden=1024,
            batch_size=8, train_images=54, test_images=107, epochs=10, repeats=3)
QUICK = dict(backbone="resnet18", image_size=32, dims=64, disc_hidden=64, batch_size=4,
             train_images=12, test_images=6, epochs=1, repeats=1)

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile = {"s": 0.0, "events": 0}


def _on_duration(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile["s"] += seconds
    _compile["events"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
  """Seconds JAX has spent tracing, lowering and compiling in this process so far."""
  return _compile["s"]


def peak_bytes():
  """The largest `peak_bytes_in_use` of the local devices, None where the backend has none."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  return max(peaks) if peaks and None not in peaks and len(peaks) == len(stats) else None


def memory_limit():
  """The first local device's `bytes_limit` (what the allocator may use), None where unknown."""
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("bytes_limit") if stats else None


def _mib(n) -> str:
  return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def timed(fn):
  """(seconds, result) of `fn()`; `fn` returns once its work is done."""
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def images_of(args) -> tuple[np.ndarray, np.ndarray, str]:
  """(train images (N, S, S, 3), test images (M, S, S, 3), where they came from)."""
  use_mpdd = args.source == "mpdd" or (
      args.source == "auto" and os.path.isdir(os.path.join(args.root, args.class_name)))
  if use_mpdd:
    train, _ = side_by_side.load_images(args, "train")
    test, _ = side_by_side.load_images(args, "test")
    return (train[:args.train_images or len(train)], test[:args.test_images or len(test)],
            f"mpdd/{args.class_name} ({args.root})")
  n = args.train_images or args.random_images[0]
  m = args.test_images or args.random_images[1]
  rng = np.random.default_rng(0)
  shape = (args.image_size, args.image_size, 3)
  # Preprocessed images are ImageNet-normalized: roughly zero mean, unit variance.
  return (rng.standard_normal((n, *shape), np.float32),
          rng.standard_normal((m, *shape), np.float32), "random")


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes (resnet18, 32 px, 64 dims, a dozen random images) to check "
                           "the script on a CPU in about a minute")
  parser.add_argument("--source", default=None, choices=("auto", "mpdd", "random"),
                      help="images: auto = MPDD when --root holds the class, else random "
                           "(default auto; random with --quick)")
  mpdd_args.add_mpdd_args(parser)
  parser.add_argument("--dataset", default="mpdd")
  parser.add_argument("--backbone", default=None, help=f"default {FULL['backbone']}")
  parser.add_argument("--layers", default="layer2,layer3")
  parser.add_argument("--image_size", type=int, default=None, help=f"default {FULL['image_size']}")
  parser.add_argument("--dims", type=int, default=None,
                      help=f"backbone.pretrain_dim and target_dim (default {FULL['dims']})")
  parser.add_argument("--disc_hidden", type=int, default=None,
                      help=f"model.disc_hidden (default {FULL['disc_hidden']})")
  parser.add_argument("--batch_size", type=int, default=None, help=f"default {FULL['batch_size']}")
  parser.add_argument("--train_images", type=int, default=None,
                      help="images trained on (default: all of the MPDD class, or "
                           f"{FULL['train_images']} random)")
  parser.add_argument("--test_images", type=int, default=None,
                      help="images of the inference pass (default: all of the MPDD class, or "
                           f"{FULL['test_images']} random)")
  parser.add_argument("--epochs", type=int, default=None,
                      help=f"timed epochs per setting (default {FULL['epochs']})")
  parser.add_argument("--repeats", type=int, default=None,
                      help=f"timed extraction and inference passes (default {FULL['repeats']})")
  parser.add_argument("--runs", default="1,8", help="train.num_runs values")
  parser.add_argument("--compute_dtypes", default="float32,bfloat16",
                      help="train.compute_dtype values")
  parser.add_argument("--budget_s", type=float, default=420,
                      help="phases that would start later than this are skipped")
  args = parser.parse_args()
  defaults = QUICK if args.quick else FULL
  for key, value in defaults.items():
    if getattr(args, key) is None and key not in ("train_images", "test_images"):
      setattr(args, key, value)
  if args.source is None:
    args.source = "random" if args.quick else "auto"
  args.random_images = (defaults["train_images"], defaults["test_images"])
  args.images = 0  # side_by_side.load_images: every image; counts are applied after loading
  return args


def main():
  args = parse_args()
  t_start = time.perf_counter()
  load_start = side_by_side.load()
  print(f"start: {load_start}")
  if jax.default_backend() == "cpu" and not args.quick:
    print("note: JAX runs on the CPU; the paper's settings take long there (--quick is the CPU "
          "check)")
  runs_list = [int(r) for r in args.runs.split(",")]
  dtypes = args.compute_dtypes.split(",")

  config = side_by_side.config_from(args)
  config.backbone.pretrain_dim = config.backbone.target_dim = args.dims
  config.model.disc_hidden = args.disc_hidden
  b, bs = config.backbone, args.batch_size
  train_images, test_images, source = images_of(args)
  mesh = sharding.make_mesh()
  result = {
      "benchmark": "device", "quick": args.quick, "backend": jax.default_backend(),
      "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "jax": jax.__version__, "images_source": source,
      "backbone": b.name, "layers": list(b.layers), "dims": b.target_dim,
      "disc_hidden": config.model.disc_hidden, "image_size": args.image_size, "batch_size": bs,
      "train_images": len(train_images), "test_images": len(test_images),
      "memory_limit_bytes": memory_limit(), "extraction": None, "epoch": [], "inference": None,
      "skipped": []}
  print(f"{result['devices']} x {result['device']} ({result['device_kind']}); {b.name} "
        f"{'+'.join(b.layers)}, {b.target_dim} dims, {args.image_size} px, batch {bs}; images: "
        f"{source}, {len(train_images)} train, {len(test_images)} test; device memory "
        f"{_mib(result['memory_limit_bytes'])}")

  # Extraction.
  c0 = compile_seconds()
  extractor = features_lib.extractor_of(config, mesh)
  # A whole first pass compiles everything the timed ones run (the padded last batch's slicing).
  first_s, _ = timed(lambda: side_by_side.extract(extractor, train_images, bs))
  passes = [timed(lambda: side_by_side.extract(extractor, train_images, bs))
            for _ in range(args.repeats)]
  features = passes[-1][1]
  extract_s = side_by_side.median([p[0] for p in passes])
  result["extraction"] = {
      "compile_s": round(compile_seconds() - c0, 2), "first_pass_s": round(first_s, 2),
      "s": round(extract_s, 4), "images_per_s": round(len(train_images) / extract_s, 2),
      "peak_bytes": peak_bytes()}
  print(f"extraction: {len(train_images) / extract_s:.1f} images/s ({extract_s:.3f} s for "
        f"{len(train_images)}), compile {result['extraction']['compile_s']:.1f} s, peak "
        f"{_mib(result['extraction']['peak_bytes'])}")

  def epoch_phase(num_runs: int, dtype: str):
    cfg = config.copy_and_resolve_references()
    cfg.train.num_runs, cfg.train.compute_dtype = num_runs, dtype
    runs = engine.runs_of(cfg)
    c0 = compile_seconds()
    init_s, states = timed(lambda: jax.block_until_ready(
        engine.init_states(cfg, runs, features, mesh)))
    trainer = engine.Trainer(cfg, runs, mesh)
    first_s, (states, _) = timed(lambda: trainer.train(states, features, 0, 1))
    times = []
    for epoch in range(1, args.epochs + 1):
      seconds, (states, _) = timed(lambda: trainer.train(states, features, epoch, 1))
      times.append(seconds)
    epoch_s = side_by_side.median(times)
    row = {"runs": num_runs, "compute_dtype": dtype,
           "compile_s": round(compile_seconds() - c0, 2), "init_s": round(init_s, 2),
           "first_epoch_s": round(first_s, 2), "epoch_s": round(epoch_s, 4),
           "epoch_s_per_run": round(epoch_s / num_runs, 4),
           "steps_per_epoch": -(-len(train_images) // bs), "peak_bytes": peak_bytes()}
    print(f"epoch R = {num_runs} {dtype}: {epoch_s:.4f} s ({epoch_s / num_runs:.4f} s per run), "
          f"compile {row['compile_s']:.1f} s (centers and first epoch {init_s + first_s:.1f} s), "
          f"peak {_mib(row['peak_bytes'])}")
    return row, states

  def inference_phase(state):
    c0 = compile_seconds()
    first_s, _ = timed(lambda: inference_bench.pbas_jax_pass(extractor, state, test_images,
                                                             config, mesh))
    passes = [inference_bench.pbas_jax_pass(extractor, state, test_images, config, mesh)
              for _ in range(args.repeats)]
    total_s = side_by_side.median([p[0] + p[1] for p in passes])
    row = {"compile_s": round(compile_seconds() - c0, 2), "first_pass_s": round(first_s, 2),
           "extraction_s": round(side_by_side.median([p[0] for p in passes]), 4),
           "scoring_s": round(side_by_side.median([p[1] for p in passes]), 4),
           "total_s": round(total_s, 4), "images_per_s": round(len(test_images) / total_s, 2),
           "peak_bytes": peak_bytes()}
    print(f"inference: {row['images_per_s']:.1f} images/s ({len(test_images)} images: extraction "
          f"{row['extraction_s']:.3f} s, scoring and maps {row['scoring_s']:.3f} s), compile "
          f"{row['compile_s']:.1f} s, peak {_mib(row['peak_bytes'])}")
    return row

  # R = 1 float32 first (inference scores its first run), then the others; phases that would
  # start past the budget are skipped.
  settings = sorted(((r, d) for r in runs_list for d in dtypes),
                    key=lambda s: (s != (1, "float32"), runs_list.index(s[0]), dtypes.index(s[1])))
  for num_runs, dtype in settings:
    if time.perf_counter() - t_start > args.budget_s:
      result["skipped"].append(f"epoch R={num_runs} {dtype}")
      continue
    row, states = epoch_phase(num_runs, dtype)
    result["epoch"].append(row)
    if (num_runs, dtype) == (1, "float32"):
      if time.perf_counter() - t_start <= args.budget_s:
        result["inference"] = inference_phase(engine.unstack(states)[0])
    del states
  if result["inference"] is None:
    result["skipped"].append("inference" if (1, "float32") in settings else
                             "inference (needs R=1 float32 in --runs/--compute_dtypes)")
  if not _compile["events"]:
    print("note: this JAX reported no compile durations (jax.monitoring events renamed?): "
          "compile_s figures are 0")
  for what in result["skipped"]:
    print(f"skipped (past --budget_s={args.budget_s:g} s or not asked for): {what}")
  result["peak_bytes"] = peak_bytes()
  result["wall_s"] = round(time.perf_counter() - t_start, 1)
  print(f"peak device memory {_mib(result['peak_bytes'])}; wall {result['wall_s']} s")
  side_by_side.finish(result, args, load_start)


if __name__ == "__main__":
  main()
