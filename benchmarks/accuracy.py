r"""Real-data accuracy over seeds: PBAS, its ablations and a yardstick on MPDD metal_plate.

  python benchmarks/accuracy.py [--root $PBAS_DATA/mpdd] [--runs 3] [--epochs 60] [--eval_every 20]
      [--variants full,abl,nn,gaussian] [--epochs_gaussian 60] [--param_ema 0.99] [--out DIR]

EfficientNet-Lite0 (ImageNet weights, blocks2 + blocks4, 384 dims, as configs/demo.py) at 288 px.
Each trained variant trains `--runs` seeds together as vmapped runs of the engine and is scored
on the test set every `--eval_every` epochs and after its last epoch. Variants (run in the order
given; `--epochs_<variant>` overrides `--epochs` for one of them):
  full       full PBAS: ABL (alignment center) + AFS (ray synthesis) + RBO (discriminator). The
             same training also keeps parameter averages (`train.param_ema`, our addition) and
             is scored twice: raw parameters ("full PBAS") and averaged ("full + param EMA").
  gaussian   ABL + Gaussian-noise synthesis (SimpleNet, sigma 0.015) + RBO
  abl        ABL alone: projector trained with L_c only, scored by the distance to the nearest center
  nn         yardstick, no training: distance to the nearest training patch (full bank), same
             features, smoothing and metrics
  full_bf16  full PBAS with `train.compute_dtype=bfloat16` (heads' matmul operands)

Reported per row: mean +- std over seeds (std with ddof=1) of the LAST epoch (no test-set
selection), the curve (mean over seeds at each evaluated epoch), and, labelled "test-selected
(optimistic, uses the test set)", the mean +- std of each seed's best evaluated epoch by
I-AUROC + P-AUROC (the reference's selection) so the selection gap is visible. Epochs are 1-based
(epoch e = after e epochs of training). Features are extracted once (or read from the feature
cache) and shared by all variants. Writes `accuracy.json` and `curves.csv` to `--out` after every
evaluation, prints a table, the curves, and one JSON line last.
"""
import argparse
import csv
import io
import json
import os
import tempfile
import time

import jax
import numpy as np

import mpdd_args
from pbas_jax import config_base
from pbas_jax import data
from pbas_jax import engine
from pbas_jax import feature_cache
from pbas_jax import features as features_lib
from pbas_jax import fileio
from pbas_jax import inference
from pbas_jax import metrics as metrics_lib
from pbas_jax import report
from pbas_jax import sharding

# Config changes of each variant; None: not trained (the yardstick).
VARIANTS = {
    "full": {},
    "gaussian": {"model.synthesis": "gaussian"},
    "abl": {"model.rbo": False, "model.scoring": "center_distance"},
    "nn": None,
    "full_bf16": {"train.compute_dtype": "bfloat16"},
}
DEFAULT_VARIANTS = "full,abl,nn,gaussian"
LABELS = {
    "full": "full PBAS",
    "full_ema": "full + param EMA (ours)",
    "gaussian": "Gaussian synthesis",
    "abl": "ABL alone",
    "nn": "nearest-neighbour yardstick",
    "full_bf16": "full PBAS, bfloat16",
}
SELECTED = "test-selected (optimistic, uses the test set)"
SHORT = {"i_auroc": "I-AUROC", "i_ap": "I-AP", "p_auroc": "P-AUROC", "p_ap": "P-AP",
         "p_pro": "P-PRO"}


def base_config(args) -> "config_base.ml_collections.ConfigDict":
  """configs/demo.py's backbone and heads on the MPDD class at `args.image_size`."""
  config = config_base.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                         "configs", "demo.py"))
  config.dataset.name = "mpdd"
  config.dataset.root = args.root
  config.dataset.classes = args.class_name
  config.dataset.image_size = config.dataset.resize = args.image_size
  config.dataset.data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), "pbas_bench_tfds")
  config.train.num_runs = args.runs
  config.eval.heatmaps = 0
  return config


def variant_config(args, name: str):
  config = config_base.apply_overrides(base_config(args), VARIANTS[name])
  if name == "full":
    config.train.param_ema = args.param_ema
  config.train.epochs = epochs_of(args, name)
  config_base.validate(config)
  return config


def epochs_of(args, name: str) -> int:
  return getattr(args, f"epochs_{name}", None) or args.epochs


def load_features(config, mesh) -> tuple[feature_cache.Split, feature_cache.Split]:
  """(train, test) feature splits of the class, through the disk feature cache."""
  name = config.dataset.classes
  extractor = features_lib.extractor_of(config, mesh)
  directory = os.path.join(fileio.cache_dir(), "features")
  splits = []
  for split in ("train", "test"):
    source = data.load_configured(config, name, split)
    splits.append(feature_cache.load_or_extract(extractor, source, config, np.zeros(0, int),
                                                f"{name} {split} features", directory=directory))
  return tuple(splits)


def _metrics(result: dict) -> dict:
  return {k: result[k] for k in report.METRIC_KEYS}


def train_variant(config, train_split, test, mesh, eval_every: int, label: str,
                  on_eval=lambda partial: None) -> dict:
  """Trains `config`'s runs together and scores them every `eval_every` epochs and at the end.

  Returns:
    `{row: [per seed: [{"epoch": e, **metrics}, ...]]}`; rows are `label`, and with
    `train.param_ema > 0` also `label + "_ema"` (the same training scored with the averages;
    `label` is then scored with the raw parameters). Also `"seconds"`: training and scoring time.
    `on_eval` gets the same dict, so far, after every evaluation.
  """
  runs = engine.runs_of(config)
  epochs = config.train.epochs
  ema = config.train.param_ema > 0
  features = sharding.put(train_split.features, sharding.replicated(mesh))
  t0 = time.time()
  states = engine.init_states(config, runs, features, mesh)
  trainer = engine.Trainer(config, runs, mesh)
  rows = {label: [[] for _ in runs], **({f"{label}_ema": [[] for _ in runs]} if ema else {})}
  seconds = {"train": 0.0, "score": 0.0, "init": time.time() - t0}
  epoch = 0
  while epoch < epochs:
    stop = min(epochs, epoch + eval_every - epoch % eval_every)
    t = time.time()
    states, per_epoch = trainer.train(states, features, epoch, stop - epoch)
    t_train = time.time() - t
    seconds["train"] += t_train
    t = time.time()
    for r, state in enumerate(engine.unstack(states)):
      if ema:
        rows[f"{label}_ema"][r].append(
            {"epoch": stop, **_metrics(inference.evaluate(state, test, config, mesh))})
        state = state.replace(ema_params=None)
      rows[label][r].append(
          {"epoch": stop, **_metrics(inference.evaluate(state, test, config, mesh))})
    seconds["score"] += time.time() - t
    last = per_epoch[-1]
    means = {row: np.mean([seed[-1]["i_auroc"] for seed in v]) for row, v in rows.items()}
    print(f"[{label}] epochs {epoch + 1}-{stop} of {epochs}: {t_train:.0f} s training "
          f"({t_train / (stop - epoch):.1f} s/epoch incl. any compile), {time.time() - t:.0f} s "
          f"scoring; loss {np.mean([m['loss'] for m in last]):.4g}; mean I-AUROC "
          + ", ".join(f"{row} {100 * v:.1f}" for row, v in means.items()), flush=True)
    epoch = stop
    on_eval({**rows, "seconds": seconds})
  return {**rows, "seconds": seconds}


def yardstick(config, train_split, test) -> dict:
  """The nearest-neighbour row: `{"nn": [[{"epoch": 0, **metrics}]], "seconds": ...}`."""
  t = time.time()
  scores, maps = inference.nearest_neighbour_split(
      train_split.features, test.features, config.dataset.image_size,
      float(config.eval.smoothing_sigma), batch_size=config.eval.batch_size)
  result = metrics_lib.compute_all(scores, test.labels, maps, test.masks, config.eval.pro_variant)
  return {"nn": [[{"epoch": 0, **_metrics(result)}]], "seconds": {"score": time.time() - t}}


def _stats(values: list) -> tuple[float | None, float | None]:
  """Mean and sample std (ddof=1; 0 for one value) of the defined values, None if none are."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _selection_score(point: dict) -> float:
  return (point["i_auroc"] or 0.0) + (point["p_auroc"] or 0.0)


def summarize(seeds: list[list[dict]]) -> dict:
  """One row's figures from its per-seed curves: last epoch, curve, test-selected epoch."""
  last = [curve[-1] for curve in seeds]
  best = [max(curve, key=_selection_score) for curve in seeds]
  epochs = [point["epoch"] for point in seeds[0]]
  return {
      "seeds": len(seeds),
      "epoch": last[0]["epoch"],
      "last": {k: _stats([p[k] for p in last]) for k in report.METRIC_KEYS},
      "selected": {k: _stats([p[k] for p in best]) for k in report.METRIC_KEYS},
      "selected_epochs": [p["epoch"] for p in best],
      "curve": [{"epoch": e, **{k: _stats([c[i][k] for c in seeds])[0]
                                for k in report.METRIC_KEYS}}
                for i, e in enumerate(epochs)],
  }


def _pm(stats: tuple) -> str:
  mean, std = stats
  return "-" if mean is None else f"{100 * mean:5.1f} +- {100 * std:3.1f}"


def format_tables(summaries: dict) -> str:
  """The last-epoch table, the test-selected table beside its rows, and the curves."""
  width = max(len(LABELS.get(r, r)) for r in summaries) + 2
  head = "".join(f"{SHORT[k]:>14}" for k in report.METRIC_KEYS)
  out = [f"LAST epoch, mean +- std over seeds (%):\n{'row':<{width}}{'epoch':>6}{'seeds':>6}{head}"]
  for row, s in summaries.items():
    out.append(f"{LABELS.get(row, row):<{width}}{s['epoch']:>6}{s['seeds']:>6}"
               + "".join(f"{_pm(s['last'][k]):>14}" for k in report.METRIC_KEYS))
  out.append(f"\n{SELECTED}, each seed's best evaluated epoch by I-AUROC + P-AUROC (%):\n"
             f"{'row':<{width}}{'epochs':>14}{head}")
  for row, s in summaries.items():
    if len(s["curve"]) > 1:
      out.append(f"{LABELS.get(row, row):<{width}}{','.join(map(str, s['selected_epochs'])):>14}"
                 + "".join(f"{_pm(s['selected'][k]):>14}" for k in report.METRIC_KEYS))
  for row, s in summaries.items():
    if len(s["curve"]) > 1:
      out.append(f"\ncurve, {LABELS.get(row, row)} (mean over seeds, %):\n  epoch"
                 + "".join(f"{SHORT[k]:>9}" for k in report.METRIC_KEYS))
      for p in s["curve"]:
        out.append(f"  {p['epoch']:5d}" + "".join(
            f"{'-' if p[k] is None else f'{100 * p[k]:.1f}':>9}" for k in report.METRIC_KEYS))
  return "\n".join(out)


def curves_csv(raw: dict) -> str:
  """Every evaluated point: row, seed index, epoch, metrics."""
  f = io.StringIO()
  w = csv.writer(f)
  w.writerow(["row", "seed", "epoch", *report.METRIC_KEYS])
  for row, seeds in raw.items():
    for s, curve in enumerate(seeds):
      for p in curve:
        w.writerow([row, s, p["epoch"], *(p[k] for k in report.METRIC_KEYS)])
  return f.getvalue()


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  mpdd_args.add_mpdd_args(parser)
  parser.add_argument("--image_size", type=int, default=288)
  parser.add_argument("--runs", type=int, default=3, help="seeds per variant (vmapped runs)")
  parser.add_argument("--epochs", type=int, default=60)
  for name in VARIANTS:
    if VARIANTS[name] is not None:
      parser.add_argument(f"--epochs_{name}", type=int, default=None,
                          help=f"epochs of `{name}` (default --epochs)")
  parser.add_argument("--eval_every", type=int, default=20, help="test-curve interval (epochs)")
  # 0.99: a time constant of 100 steps, 14 epochs of metal_plate's 7 steps (at 0.999 the average
  # still weighs the initial heads 0.999 ** 1400 = 25% after 200 epochs).
  parser.add_argument("--param_ema", type=float, default=0.99,
                      help="train.param_ema of `full` (per-step decay; 0 = no EMA row)")
  parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                      help=f"comma-separated, run in this order, of {','.join(VARIANTS)}")
  parser.add_argument("--data_dir", default=None, help="prepared TFDS data (default: a temp dir)")
  parser.add_argument("--out", default=None, help="folder for accuracy.json and curves.csv")
  args = parser.parse_args(argv)
  unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
  if unknown:
    parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
  return args


def run(args) -> dict:
  """Runs the benchmark; returns the JSON record printed last."""
  names = args.variants.split(",")
  mesh = sharding.make_mesh()
  config = base_config(args)
  t = time.time()
  train_split, test = load_features(config, mesh)
  print(f"features: train {train_split.features.shape}, test {test.features.shape} "
        f"({time.time() - t:.0f} s)", flush=True)
  raw, seconds = {}, {}
  record = {}

  def save(partial: dict | None = None):
    rows = {**raw, **{k: v for k, v in (partial or {}).items() if k != "seconds"}}
    record.clear()
    record.update({
        "benchmark": "accuracy", "class": args.class_name, "image_size": args.image_size,
        "backbone": "efficientnet_lite0", "runs": args.runs, "eval_every": args.eval_every,
        "param_ema": args.param_ema, "std": "over seeds, ddof=1",
        "epochs": {n: (0 if VARIANTS[n] is None else epochs_of(args, n)) for n in names},
        "seconds": seconds, "devices": jax.device_count(),
        "rows": {row: {"label": LABELS.get(row, row), **summarize(seeds)}
                 for row, seeds in rows.items() if seeds and all(seeds)},
    })
    if args.out:
      fileio.atomic_write(os.path.join(args.out, "accuracy.json"), json.dumps(record, indent=1))
      fileio.atomic_write(os.path.join(args.out, "curves.csv"), curves_csv(rows))

  for name in names:
    if VARIANTS[name] is None:
      result = yardstick(config, train_split, test)
    else:
      result = train_variant(variant_config(args, name), train_split, test, mesh,
                             args.eval_every, name, on_eval=save)
    seconds[name] = result.pop("seconds")
    raw.update(result)
    save()
  print("\n" + format_tables({row: record["rows"][row] for row in raw}))
  return record


def main(argv=None):
  record = run(parse_args(argv))
  print(json.dumps(record))
  return record


if __name__ == "__main__":
  main()
