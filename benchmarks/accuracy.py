r"""Real-data accuracy: PBAS and the paper's ablation rows on MPDD metal_plate, EfficientNet-Lite0.

  python benchmarks/accuracy.py --root ../shared/data/mpdd --epochs 60

Rows (Table V of the paper, measured the same way here):
  full PBAS      ABL (alignment center) + AFS (ray synthesis) + RBO (discriminator)
  gaussian AFS   ABL + Gaussian-noise synthesis (SimpleNet, sigma 0.015) + RBO
  ABL alone      projector trained with L_c only, scored by the distance to the nearest center
The last epoch is reported (no test-set selection); test metrics are also recorded every
`--every` epochs as a curve. Prints a table, the curves, and one JSON line last.
"""
import argparse
import json
import os
import tempfile
import time

import mpdd_args
from pbas_jax import config_base
from pbas_jax import experiment
from pbas_jax import report

VARIANTS = {
    "full PBAS": {},
    "gaussian AFS": {"model.synthesis": "gaussian"},
    "ABL alone": {"model.rbo": False, "model.scoring": "center_distance"},
}


def config_for(args, changes: dict):
  config = config_base.load(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
  config.dataset.name = "mpdd"
  config.dataset.root = args.root
  config.dataset.classes = args.class_name
  config.dataset.image_size = config.dataset.resize = args.image_size
  config.dataset.data_dir = os.path.join(tempfile.gettempdir(), "pbas_bench_tfds")
  config.train.epochs = args.epochs
  config.train.checkpoint_every = args.epochs
  config.eval.every_epochs = args.every
  config.eval.heatmaps = 0
  return config_base.apply_overrides(config, changes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  mpdd_args.add_mpdd_args(parser)
  parser.add_argument("--image_size", type=int, default=288)
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--every", type=int, default=10, help="test-curve interval (epochs)")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()

  workdir = args.workdir or tempfile.mkdtemp(prefix="pbas_accuracy_")
  rows, curves = [], {}
  for name in args.variants.split(","):
    config = config_for(args, VARIANTS[name])
    run_dir = os.path.join(workdir, name.replace(" ", "_"))
    t = time.time()
    results = experiment.train_and_evaluate(config, run_dir)
    row = dict(results["rows"][0], variant=name)
    row["wall_time_s"] = time.time() - t
    rows.append(row)
    with open(os.path.join(run_dir, f"mpdd_{args.class_name}", "metrics.jsonl")) as f:
      curves[name] = [{k: v for k, v in json.loads(line).items()
                       if k == "epoch" or k.startswith("test_")}
                      for line in f if "test_i_auroc" in line]

  print("\n" + report.format_table(rows, "last"))
  for name, curve in curves.items():
    print(f"\ncurve, {name}: epoch  I-AUROC  P-AUROC  P-PRO")
    for point in curve:
      print(f"  {point['epoch']:5d}  {100 * point['test_i_auroc']:7.1f}  "
            f"{100 * point['test_p_auroc']:7.1f}  {100 * point['test_p_pro']:5.1f}")
  print(json.dumps({"benchmark": "accuracy", "class": args.class_name, "epochs": args.epochs,
                    "image_size": args.image_size, "backbone": "efficientnet_lite0",
                    "rows": [{k: row[k] for k in ("variant", *report.METRIC_KEYS, "epoch",
                                                  "wall_time_s")} for row in rows],
                    "curves": curves}))


if __name__ == "__main__":
  main()
