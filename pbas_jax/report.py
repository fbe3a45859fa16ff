"""Reports: per-class results tables (text, csv, json, markdown) and heatmap panels.

A results row is the dict of the run-outputs contract: {"dataset", "class", "seed", "i_auroc",
"i_ap", "p_auroc", "p_ap", "p_pro", "pro_variant", "epoch", "selection", "wall_time_s",
"images_per_s"} plus optional extra keys (e.g. "alpha", "run"). Metrics are fractions in [0, 1]
or None where not measurable; tables print them in percent with one decimal. Every file is written
to a temporary name and renamed, so a reader never sees half a file.
"""
import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

METRIC_KEYS = ("i_auroc", "i_ap", "p_auroc", "p_ap", "p_pro")
METRIC_TITLES = ("I-AUROC", "I-AP", "P-AUROC", "P-AP", "P-PRO")
ROW_KEYS = ("dataset", "class", "seed", *METRIC_KEYS, "pro_variant", "epoch", "selection",
            "wall_time_s", "images_per_s")
SELECTIONS = ("last", "test_oracle")
TEST_ORACLE_NOTE = ("MODEL SELECTED ON THE TEST SET (selection='test_oracle'): each class reports "
                    "the epoch with the highest test I-AUROC + P-AUROC, as the reference code "
                    "does; these numbers are optimistic, not held-out results")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder and a rename."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _common(rows: Sequence[dict[str, Any]], key: str) -> Any:
  values = {r.get(key) for r in rows}
  return values.pop() if len(values) == 1 else None


def mean_row(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
  """The mean row over classes and the notes it needs.

  Each metric is averaged over the rows that measured it (a note says when some did not); P-PRO
  is left out when rows mix PRO variants. `epoch`, `seed`, `pro_variant` and `selection` are kept
  when all rows agree and None otherwise; `wall_time_s` is the total and `images_per_s` the mean.
  """
  if not rows:
    raise ValueError("no result rows to report")
  notes = []
  mean: dict[str, Any] = {"dataset": _common(rows, "dataset") or "all", "class": "mean"}
  for key in ("seed", "pro_variant", "epoch", "selection"):
    mean[key] = _common(rows, key)
  for key in METRIC_KEYS:
    measured = [r[key] for r in rows if r.get(key) is not None]
    if key == "p_pro" and measured and mean["pro_variant"] is None:
      measured = []
      notes.append("mean p_pro not computed: rows mix PRO variants")
    elif measured and len(measured) < len(rows):
      notes.append(f"mean {key} is over {len(measured)} of {len(rows)} rows (others not measured)")
    mean[key] = float(np.mean(measured)) if measured else None
  times = [r["wall_time_s"] for r in rows if r.get("wall_time_s") is not None]
  rates = [r["images_per_s"] for r in rows if r.get("images_per_s") is not None]
  mean["wall_time_s"] = float(np.sum(times)) if times else None
  mean["images_per_s"] = float(np.mean(rates)) if rates else None
  return mean, notes


def _check_rows(rows: Sequence[dict[str, Any]], selection: str) -> list[dict[str, Any]]:
  if selection not in SELECTIONS:
    raise ValueError(f"eval.selection={selection!r}: use one of {SELECTIONS}")
  checked = []
  for r in rows:
    missing = [k for k in ("dataset", "class", *METRIC_KEYS) if k not in r]
    if missing:
      raise ValueError(f"result row {r.get('dataset')}/{r.get('class')} lacks keys {missing}")
    if r.get("selection", selection) != selection:
      raise ValueError(f"row {r['dataset']}/{r['class']} was selected by {r['selection']!r}, "
                       f"the report by {selection!r}: report one protocol at a time")
    checked.append({**r, "selection": selection})
  return checked


def _all_notes(selection: str, notes: Iterable[str]) -> list[str]:
  lead = [TEST_ORACLE_NOTE] if selection == "test_oracle" else []
  return list(dict.fromkeys([*lead, *notes]))  # ordered, without repeats


def _extra_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
  return sorted({k for r in rows for k in r} - set(ROW_KEYS))


def _cell(key: str, value: Any) -> str:
  if value is None:
    return "-"
  if key in METRIC_KEYS:
    return f"{100 * value:.1f}"
  if isinstance(value, float):
    return f"{value:.1f}" if key in ("wall_time_s", "images_per_s") else f"{value:g}"
  return str(value)


def _table(rows: Sequence[dict[str, Any]], mean: dict[str, Any]) -> list[list[str]]:
  """Header and cells: one line per row, then the mean row."""
  extras = _extra_keys(rows)
  keys = ["dataset", "class", *extras, *METRIC_KEYS, "epoch", "wall_time_s", "images_per_s"]
  header = ["dataset", "class", *extras, *METRIC_TITLES, "epoch", "time (s)", "img/s"]
  lines = [[_cell(k, r.get(k)) for k in keys] for r in [*rows, mean]]
  epoch_col = keys.index("epoch")
  if mean.get("epoch") is None:
    lines[-1][epoch_col] = "varies"
  return [header, *lines]


def format_table(rows: Sequence[dict[str, Any]], selection: str = "last",
                 notes: Iterable[str] = ()) -> str:
  """Plain-text table of the rows and their mean (percent, one decimal), then the notes."""
  rows = _check_rows(rows, selection)
  mean, mean_notes = mean_row(rows)
  table = _table(rows, mean)
  widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
  # Names left-aligned, numbers right-aligned.
  text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(line, widths))) for line in table]
  text.insert(1, "  ".join("-" * w for w in widths))
  text.insert(-1, text[1])
  variant = mean.get("pro_variant") or "mixed"
  text.append(f"selection: {selection}; P-PRO variant: {variant}")
  text += [f"note: {n}" for n in _all_notes(selection, [*notes, *mean_notes])]
  return "\n".join(text)


def _markdown(rows, mean, selection, notes) -> str:
  table = _table(rows, mean)
  out = ["# Results", ""]
  if selection == "test_oracle":
    out += [f"**{TEST_ORACLE_NOTE}.**", ""]
  out += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
  out += ["| " + " | ".join(line) + " |" for line in table[1:-1]]
  out += ["| " + " | ".join(f"**{c}**" for c in table[-1]) + " |", ""]
  out += [f"Metrics in percent. Selection: `{selection}`; P-PRO variant: "
          f"`{mean.get('pro_variant') or 'mixed'}`; time (s) of the mean row is the total.", ""]
  if notes:
    out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(out)


def _csv(rows, mean, selection) -> str:
  columns = [*ROW_KEYS, *_extra_keys(rows), "test_set_used_for_selection"]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
  writer.writeheader()
  for r in [*rows, mean]:
    writer.writerow({**{k: "" if r.get(k) is None else r.get(k) for k in columns},
                     "test_set_used_for_selection": selection == "test_oracle"})
  return buf.getvalue()


def write_results(directory: str | os.PathLike, rows: Sequence[dict[str, Any]], selection: str,
                  notes: Iterable[str] = (), files: Sequence[str] = ("json", "csv", "md"),
                  echo: bool = True) -> dict[str, Any]:
  """Writes `results.{json,csv,md}` (those in `files`) to `directory` and prints the table.

  Args:
    directory: output folder (created).
    rows: result rows (see the module docstring), one per class (or run).
    selection: 'last' or 'test_oracle'; with 'test_oracle' every output says the test set was used
      for model selection.
    notes: free-text caveats, e.g. "backbone weights are random: numbers are not meaningful".
    files: which of the three files to write (a class folder holds only results.json).
    echo: print the text table and notes.

  Returns:
    The results.json content: {"rows", "mean", "selection", "notes"}.
  """
  unknown = set(files) - {"json", "csv", "md"}
  if unknown:
    raise ValueError(f"unknown result files {sorted(unknown)}: use json, csv, md")
  rows = _check_rows(rows, selection)
  mean, mean_notes = mean_row(rows)
  all_notes = _all_notes(selection, [*notes, *mean_notes])
  results = {"rows": rows, "mean": mean, "selection": selection, "notes": all_notes}
  writers = {"json": lambda: json.dumps(results, indent=2) + "\n",
             "csv": lambda: _csv(rows, mean, selection),
             "md": lambda: _markdown(rows, mean, selection, all_notes)}
  for kind in files:
    atomic_write(os.path.join(directory, f"results.{kind}"), writers[kind]())
  if echo:
    print(format_table(rows, selection, notes), flush=True)
  return results


def jet(x: np.ndarray) -> np.ndarray:
  """(...) values in [0, 1] -> (..., 3) uint8 RGB of the 'jet' colormap (blue -> red)."""
  x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)[..., None]
  rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0], np.float32)), 0.0, 1.0)
  return (255 * rgb + 0.5).astype(np.uint8)


def denormalize(image: np.ndarray) -> np.ndarray:
  """(S, S, 3) ImageNet-normalized image -> (S, S, 3) uint8 RGB."""
  rgb = np.asarray(image, np.float32) * IMAGENET_STD + IMAGENET_MEAN
  return (255 * np.clip(rgb, 0.0, 1.0) + 0.5).astype(np.uint8)


_GAP = 4       # white pixels between tiles
_CAPTION = 14  # caption strip height


def heatmap_panel(image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray,
                  value_range: tuple[float, float], caption: str) -> Image.Image:
  """One panel: image | ground truth | heatmap | overlay, with a caption strip on top.

  Args:
    image: (S, S, 3) ImageNet-normalized image.
    mask: (S, S) ground truth (`== 1` anomalous), or None (a gray tile).
    amap: (S, S) anomaly map.
    value_range: map values shown as the colormap's ends (shared across panels).
    caption: text of the caption strip.

  Returns:
    An RGB image of size (4 S + 3 gaps) x (S + caption).
  """
  rgb = denormalize(image)
  size = rgb.shape[:2]
  if mask is None:
    gt = np.full((*size, 3), 128, np.uint8)
  else:
    gt = np.repeat(((np.asarray(mask) == 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
  lo, hi = value_range
  heat = jet((np.asarray(amap, np.float32) - lo) / max(hi - lo, 1e-12))
  overlay = (0.5 * rgb + 0.5 * heat + 0.5).astype(np.uint8)
  tiles = [rgb, gt, heat, overlay]
  panel = Image.new("RGB", (4 * size[1] + 3 * _GAP, size[0] + _CAPTION), "white")
  for i, tile in enumerate(tiles):
    panel.paste(Image.fromarray(tile), (i * (size[1] + _GAP), _CAPTION))
  draw = ImageDraw.Draw(panel)
  draw.text((2, 1), caption, fill="black")
  if mask is None:
    draw.text((size[1] + _GAP + 2, _CAPTION + 2), "no mask", fill="white")
  return panel


def save_heatmaps(directory: str | os.PathLike, images, masks, maps, names: Sequence[str],
                  scores, limit: int = 20,
                  value_range: tuple[float, float] | None = None) -> list[str]:
  """Writes heatmap panels (image | ground truth | heatmap | overlay) as PNG files.

  Args:
    directory: output folder (created).
    images: (N, S, S, 3) ImageNet-normalized test images.
    masks: (N, S, S) ground truth, or None.
    maps: (N, S, S) anomaly maps.
    names: N image names (e.g. "scratch/003"), used in the file names and captions.
    scores: (N,) image scores, shown in the captions.
    limit: at most this many panels, the first ones (0 = none, -1 = all).
    value_range: map values at the colormap's ends; default: min and max over all `maps`, so
      colors compare across panels.

  Returns:
    The paths written.
  """
  maps = np.asarray(maps)
  images = np.asarray(images)
  n = len(maps)
  if images.shape[:3] != maps.shape or len(names) != n or len(np.ravel(scores)) != n:
    raise ValueError(f"save_heatmaps: images {images.shape}, maps {maps.shape}, {len(names)} names "
                     f"and {len(np.ravel(scores))} scores must describe the same N images")
  if masks is not None and np.shape(masks) != maps.shape:
    raise ValueError(f"save_heatmaps: masks {np.shape(masks)} differ from maps {maps.shape}")
  count = n if limit < 0 else min(limit, n)
  if value_range is None:
    value_range = (float(maps.min()), float(maps.max())) if n else (0.0, 1.0)
  paths = []
  for i in range(count):
    panel = heatmap_panel(images[i], None if masks is None else masks[i], maps[i], value_range,
                          f"{names[i]}  score {float(np.ravel(scores)[i]):.4f}")
    buf = io.BytesIO()
    panel.save(buf, format="PNG")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(names[i])).strip("_")
    path = os.path.join(os.fspath(directory), f"{i:04d}_{safe}.png")
    atomic_write(path, buf.getvalue())
    paths.append(path)
  return paths
