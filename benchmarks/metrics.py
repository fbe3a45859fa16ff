"""Seconds per metric on a test-set-sized input: 150 maps of 288x288 (12.4M pixels).

Maps are produced the way evaluation produces them (36x36 patch scores -> `anomaly_maps`), with
random elliptic defects in half of the images. Prints one line per metric, then one JSON line.

  python benchmarks/metrics.py [--num 150] [--size 288] [--repeats 3]
"""
import argparse
import json
import time

import numpy as np

from pbas_jax import inference, metrics


def make_inputs(num: int, size: int, seed: int = 0):
  """(N,) scores and labels, (N, size, size) maps and 0/1 masks."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((num, size, size), np.float32)
  for i in range(num // 2, num):
    for _ in range(rng.integers(1, 4)):
      cy, cx = rng.integers(0, size, 2)
      ry, rx = rng.uniform(3, size / 8, 2)
      masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
  grid = size // 8
  patch = rng.random((num, grid, grid), dtype=np.float32)
  patch += 0.5 * masks.reshape(num, grid, 8, grid, 8).mean(axis=(2, 4))
  image_scores, maps = inference.scores_and_maps(patch, size, 4.0)
  labels = (masks.reshape(num, -1).max(axis=1) == 1).astype(int)
  return np.asarray(image_scores), labels, np.asarray(maps), masks


def best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    value = fn()
    times.append(time.perf_counter() - start)
  return value, min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=150)
  parser.add_argument("--size", type=int, default=288)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sklearn", action="store_true",
                      help="also time scikit-learn's pixel AUROC and AP (about 10 s each)")
  args = parser.parse_args()
  scores, labels, maps, masks = make_inputs(args.num, args.size)
  cases = {
      "i_auroc": lambda: metrics.image_auroc(scores, labels),
      "i_ap": lambda: metrics.image_ap(scores, labels),
      "p_auroc": lambda: metrics.pixel_auroc(maps, masks),
      "p_ap": lambda: metrics.pixel_ap(maps, masks),
      "p_pro_standard": lambda: metrics.aupro(maps, masks),
      "p_pro_reference": lambda: metrics.aupro_reference(maps, masks),
      "compute_all": lambda: metrics.compute_all(scores, labels, maps, masks)["p_pro"],
  }
  if args.sklearn:
    import sklearn.metrics  # pylint: disable=g-import-not-at-top
    flat_y, flat_s = masks.ravel().astype(int), maps.ravel()
    cases["sklearn_p_auroc"] = lambda: sklearn.metrics.roc_auc_score(flat_y, flat_s)
    cases["sklearn_p_ap"] = lambda: sklearn.metrics.average_precision_score(flat_y, flat_s)
  seconds = {}
  for name, fn in cases.items():
    value, seconds[name] = best_of(fn, 1 if name.startswith("sklearn") else args.repeats)
    print(f"{name:16s} {seconds[name]:7.3f} s   value {value:.4f}", flush=True)
  print(json.dumps({"benchmark": "metrics", "num_maps": args.num, "size": args.size,
                    "pixels": int(maps.size), "seconds": seconds,
                    "aupro_under_2s": seconds["p_pro_standard"] < 2.0}))


if __name__ == "__main__":
  main()
