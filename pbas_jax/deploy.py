"""A deployed detector: one ONNX file and its JSON, scored with onnxruntime, numpy and PIL (no JAX).

`pbas_jax.export` writes `<name>.onnx` (backbone -> patch features -> patch scores -> image scores
and anomaly maps, one graph; input `images` (B, S, S, 3) float32 normalized NHWC, any B; outputs
`scores` (B,) and `maps` (B, S, S)) and `<name>.json` beside it (`describe`: how to preprocess,
what was trained, the decision thresholds). `Detector` runs the pair; `predict_folder` scores a
folder as `pbas_jax.predict --detector=<name>.onnx` does.

What both predict paths (this one and JAX's `trained.predict_folder`) share also lives here, so
their outputs agree by construction: reading a folder so that an unreadable image is skipped and
reported rather than stopping the others (`read_images`), and the outputs (`write_predictions`):
`scores.csv`, heatmap panels and binary defect masks. Images are read and preprocessed by
`data.preprocess`, the functions training used.

This module and `data.preprocess` import nothing of JAX, TFDS or the training code.
"""
import csv
import dataclasses
import io
import json
import logging
import os
from typing import Sequence

import numpy as np
from PIL import Image

from pbas_jax import __version__
from pbas_jax import fileio
from pbas_jax import heatmaps as heatmaps_lib
from pbas_jax.data import preprocess

FORMAT = "pbas_jax detector"
FORMAT_VERSION = 1
INPUT = "images"
OUTPUTS = ("scores", "maps")
BATCH_SIZE = 16  # images per onnxruntime call; the graph takes any batch size

log = logging.getLogger("pbas_jax")


class NothingScoredError(RuntimeError):
  """Every image of the folder was unreadable."""


# ---------------------------------------------------------------------------------------------
# Shared by both predict paths: reading a folder, the outputs.


def image_paths(image_dir: str) -> list[str]:
  """The image files of `image_dir` (`preprocess.IMAGE_EXTENSIONS`), sorted; raises when none."""
  files = [str(p) for p in preprocess.image_files(image_dir)] if os.path.isdir(image_dir) else []
  if not files:
    raise FileNotFoundError(f"no image files ({', '.join(preprocess.IMAGE_EXTENSIONS)}) in "
                            f"{image_dir}")
  return files


def read_images(files: Sequence[str], geometry: preprocess.Geometry
                ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
  """Reads and preprocesses each file as training did; an unreadable one is skipped, not fatal.

  Returns:
    images (N, S, S, 3) float32 of the files read, their names (base names), and (name, why) of
    each file skipped, which is also logged.

  Raises:
    NothingScoredError: no file could be read (the message lists why for each).
  """
  images, names, skipped = [], [], []
  for path in files:
    name = os.path.basename(path)
    try:
      images.append(preprocess.load_image(path, geometry))
      names.append(name)
    except preprocess.DatasetError as e:  # unreadable, truncated, vanished
      skipped.append((name, str(e)))
      log.warning("skipped %s: %s", name, e)
  if not images:
    raise NothingScoredError(
        f"no image of {os.path.dirname(files[0]) if files else 'the folder'} could be read, "
        "nothing scored: " + "; ".join(f"{n}: {why}" for n, why in skipped))
  return np.stack(images), names, skipped


def mask_names(names: Sequence[str]) -> list[str]:
  """File name of each image's defect mask: `<stem>_mask.png` (as MVTec's ground truth), or
  `<name>_mask.png` for images whose stems collide (`a.png`, `a.jpg`)."""
  stems = [os.path.splitext(n)[0] for n in names]
  return [f"{s if stems.count(s) == 1 else n}_mask.png" for s, n in zip(stems, names)]


@dataclasses.dataclass(frozen=True)
class Scored:
  """One model's outputs on the images read: scores (N,), maps (N, S, S), and its thresholds
  (None where the model has none: no decision or mask is written)."""
  scores: np.ndarray
  maps: np.ndarray
  threshold: float | None
  pixel_threshold: float | None


def write_predictions(output: str, names: Sequence[str], images: np.ndarray,
                      runs: dict[str, Scored], skipped: Sequence[tuple[str, str]],
                      heatmaps: int = -1) -> str:
  """Writes `scores.csv`, heatmap panels (`heatmaps/`) and defect masks (`masks/`) to `output`.

  With several runs, each run's columns carry its name as a suffix and its panels and masks go
  to `heatmaps/<run>/`, `masks/<run>/`. CSV columns per run: `score`, `anomalous` (1 where the
  score > threshold, 0 otherwise, empty without a threshold), `defect_pixels` (pixels of the map
  above the pixel threshold, at the preprocessed S x S geometry); then `skipped` (why a file could
  not be scored, empty otherwise). Masks are 0/255 PNGs of size S x S.

  Returns:
    The path of scores.csv.
  """
  several = len(runs) > 1
  columns, header = [], ["file"]
  for run, s in runs.items():
    suffix = f"_{run}" if several else ""
    header += [f"score{suffix}", f"anomalous{suffix}", f"defect_pixels{suffix}"]
    decided = pixels = [""] * len(names)
    if s.threshold is not None:
      decided = [int(v) for v in s.scores > s.threshold]
    if s.pixel_threshold is not None:
      masks = s.maps > s.pixel_threshold
      pixels = [int(m.sum()) for m in masks]
      folder = os.path.join(output, "masks", *([run] if several else []))
      for mask, file in zip(masks, mask_names(names)):
        buf = io.BytesIO()
        Image.fromarray((mask * 255).astype(np.uint8), "L").save(buf, format="PNG")
        fileio.atomic_write(os.path.join(folder, file), buf.getvalue())
    columns.append(list(zip([f"{v:.6f}" for v in s.scores], decided, pixels)))
    if heatmaps:
      count = len(names) if heatmaps < 0 else min(heatmaps, len(names))
      heatmaps_lib.save_heatmaps(
          os.path.join(output, "heatmaps", *([run] if several else [])), images[:count], None,
          s.maps[:count], list(names[:count]), s.scores[:count], limit=-1,
          value_range=(float(s.maps.min()), float(s.maps.max())))
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow([*header, "skipped"])
  for i, name in enumerate(names):
    writer.writerow([name, *(v for c in columns for v in c[i]), ""])
  for name, why in skipped:
    writer.writerow([name, *[""] * (len(header) - 1), why])
  path = os.path.join(output, "scores.csv")
  fileio.atomic_write(path, buf.getvalue())
  return path


def summary(names: Sequence[str], runs: dict[str, Scored], skipped) -> list[str]:
  """Lines for the terminal: each image's score and decision, then the counts."""
  first = next(iter(runs.values()))
  lines = []
  for i, name in enumerate(names):
    decided = "" if first.threshold is None else (
        "  anomalous" if first.scores[i] > first.threshold else "  normal")
    lines.append(f"{first.scores[i]:.4f}{decided}  {name}")
  lines += [f"skipped {name}: {why}" for name, why in skipped]
  count = "" if first.threshold is None else (
      f", {int(np.sum(first.scores > first.threshold))} anomalous")
  lines.append(f"scored {len(names)} images{count}; skipped {len(skipped)}")
  return lines


# ---------------------------------------------------------------------------------------------
# The ONNX detector.


def json_path(onnx_path: str) -> str:
  """The JSON beside an ONNX file: `<name>.json` for `<name>.onnx`."""
  return os.path.splitext(onnx_path)[0] + ".json"


def describe(*, geometry: preprocess.Geometry, backbone: dict, dataset: str, class_name: str,
             run: dict, epoch: int, config_hash: str, decision: dict | None,
             onnx_file: str) -> dict:
  """The JSON written beside an exported detector: what a user needs to feed and read it."""
  return {
      "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
      "onnx": onnx_file,
      "input": {"name": INPUT, "shape": ["batch", geometry.size, geometry.size, 3],
                "dtype": "float32", "layout": "NHWC, RGB",
                "image_size": geometry.size, "resize": geometry.resize,
                "resize_mode": geometry.mode,
                "resample": "PIL bilinear (antialiased), then / 255",
                # str(): the float32 constants' shortest decimals (0.485, not 0.48500001...)
                "mean": [float(str(v)) for v in preprocess.IMAGENET_MEAN],
                "std": [float(str(v)) for v in preprocess.IMAGENET_STD]},
      "outputs": {"scores": "(batch,) image anomaly scores (maximum patch score)",
                  "maps": f"(batch, {geometry.size}, {geometry.size}) pixel anomaly maps"},
      "backbone": backbone, "dataset": dataset, "class": class_name, "run": run, "epoch": epoch,
      "config_hash": config_hash,
      "decision": decision and {
          **decision,
          "rule": "an image is anomalous where score > threshold, a pixel where map > "
                  "pixel_threshold; both are the threshold_quantile of the training images' "
                  "scores and map maxima; threshold_fpr/fnr/f1 are what threshold gives on the "
                  "test set; test_selected_* maximize test F1 (chosen with test labels)"},
  }


class Detector:
  """An exported detector: `scores, maps = Detector(path)(images)` with onnxruntime.

  `path` is the `.onnx` file; its JSON (`json_path`) says how to preprocess (`geometry`) and holds
  the thresholds (`threshold`, `pixel_threshold`; None when the export had none).
  """

  def __init__(self, path: str, providers: Sequence[str] | None = None):
    import onnxruntime  # pylint: disable=g-import-not-at-top  (the `onnx` extra; only here)
    meta_path = json_path(path)
    for p in (path, meta_path):
      if not os.path.isfile(p):
        raise FileNotFoundError(f"{p} not found: export the detector with python -m "
                                "pbas_jax.export --workdir=<run dir> --class_name=<class>")
    with open(meta_path) as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT or self.meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{meta_path} is not a {FORMAT} description of version {FORMAT_VERSION} "
                       f"(format {self.meta.get('format')!r}, version "
                       f"{self.meta.get('format_version')!r}): export it again with this version")
    spec = self.meta["input"]
    self.geometry = preprocess.Geometry(spec["image_size"], spec["resize"], spec["resize_mode"])
    if (not np.allclose(spec["mean"], preprocess.IMAGENET_MEAN)
        or not np.allclose(spec["std"], preprocess.IMAGENET_STD)):
      raise ValueError(f"{meta_path}: normalization mean {spec['mean']} / std {spec['std']} is "
                       "not the ImageNet one this package preprocesses with")
    decision = self.meta.get("decision") or {}
    self.threshold = decision.get("threshold")
    self.pixel_threshold = decision.get("pixel_threshold")
    options = onnxruntime.SessionOptions()
    # jax2onnx annotates convolutions' outputs with NHWC shapes where the node computes NCHW;
    # onnxruntime falls back correctly but warns once per node. Errors still show.
    options.log_severity_level = 3
    self.session = onnxruntime.InferenceSession(
        path, options, providers=list(providers or onnxruntime.get_available_providers()))

  def __call__(self, images: np.ndarray, batch_size: int = BATCH_SIZE
               ) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) preprocessed images -> scores (N,), maps (N, S, S), `batch_size` at a time."""
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
      batch = np.ascontiguousarray(images[start:start + batch_size], np.float32)
      s, m = self.session.run(list(OUTPUTS), {INPUT: batch})
      scores.append(s)
      maps.append(m)
    return np.concatenate(scores), np.concatenate(maps)


def predict_folder(detector_path: str, image_dir: str, output: str, heatmaps: int = -1,
                   threshold: float | None = None, pixel_threshold: float | None = None
                   ) -> tuple[list[str], dict[str, Scored], list[tuple[str, str]]]:
  """Scores every image of `image_dir` with an exported detector; writes `write_predictions`'
  outputs to `output`. `threshold` / `pixel_threshold` replace the JSON's.

  Returns:
    (names scored, {run name: Scored}, skipped (name, why)).
  """
  detector = Detector(detector_path)
  images, names, skipped = read_images(image_paths(image_dir), detector.geometry)
  scores, maps = detector(images)
  run = (detector.meta.get("run") or {}).get("name") or "run"
  runs = {run: Scored(scores, maps, detector.threshold if threshold is None else threshold,
                      detector.pixel_threshold if pixel_threshold is None else pixel_threshold)}
  write_predictions(output, names, images, runs, skipped, heatmaps)
  return names, runs, skipped
