"""Preprocessed access to a prepared class, and fixed-shape numpy batches.

  source = load_split("mpdd", "/data/mpdd", "metal_plate", "test", data_dir="/data/tfds")
  for batch in batches(source, 8):           # ordered; seed=... shuffles
    batch["image"]                           # (8, S, S, 3) float32, ImageNet-normalized
  crop_losses(source).message()              # "" unless the crop cuts defects (warn once)

Every batch has exactly `batch_size` rows: the last partial batch is padded with zero rows and
`valid` (B,) says which rows are real, so a jitted consumer sees one shape. Consumers drop or
mask the padded rows (`batch["image"][batch["valid"]]`). A process of a multi-process run decodes
only its own rows of every batch (`batches(..., rows=sharding.example_rows(mesh, B))`) and reads
the labels and names of all rows from the stored records (`source.describe()`, no decoding).
"""
import collections
import concurrent.futures
import dataclasses
import io
import os
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from pbas_jax.data import builders
from pbas_jax.data import preprocess
from pbas_jax.data.preprocess import DatasetError


class Source:
  """Random access to one preprocessed split of a class: `len(source)`, `source[i]`.

  `source[i]` is a dict of numpy values:
    image        float32 (S, S, 3), normalized
    mask         float32 (S, S), 0/1 by the dataset's mask rule; NaN when the image's mask is
                 unknown (a defective image of a folder dataset without ground_truth/), so that a
                 pixel metric cannot silently treat it as defect-free
    has_mask     bool, False exactly when `mask` is NaN
    label        int32: 0 normal, 1 anomalous
    defect_type  str: "good" or the defect type
    filename     str: source path relative to the raw root
    index        int64: i
  `has_masks` is False when any defective image lacks a mask: pixel metrics must be skipped.
  `geometry` (`preprocess.Geometry`) says how every image and mask became (S, S).
  """

  def __init__(self, data_source, *, dataset: str, class_name: str, split: str,
               geometry: preprocess.Geometry, mask_rule: str, has_masks: bool):
    self._data = data_source
    self.dataset, self.class_name, self.split = dataset, class_name, split
    self.geometry, self.mask_rule = geometry, mask_rule
    self.has_masks = has_masks

  def __len__(self) -> int:
    return len(self._data)

  def read(self, indices: Sequence[int]) -> list:
    """Stored (still encoded) examples; cheap, unlike `decode`."""
    return list(self._data.__getitems__([int(i) for i in indices]))

  def describe(self, indices: Optional[Sequence[int]] = None) -> dict:
    """label (K,) int32, defect_type and filename (K,) str of the examples `indices` (default:
    all, in order), read from the stored records without decoding any image."""
    order = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64)
    records = [r for start in range(0, len(order), 64) for r in self.read(order[start:start + 64])]
    return {"label": np.array([int(r["label"]) for r in records], np.int32).reshape(-1),
            "defect_type": np.array([r["defect_type"].decode() for r in records], str),
            "filename": np.array([r["filename"].decode() for r in records], str)}

  def padding(self) -> dict:
    """The example that pads a batch (zero image and mask, label 0, index -1, "" strings)."""
    s = self.geometry.size
    return {"image": np.zeros((s, s, 3), np.float32), "mask": np.zeros((s, s), np.float32),
            "has_mask": False, "label": np.int32(0), "defect_type": "", "filename": "",
            "index": np.int64(-1)}

  def decode(self, record: dict, index: int) -> dict:
    """Decodes and preprocesses one stored example (thread-safe; PIL releases the GIL)."""
    filename = record["filename"].decode()
    s = self.geometry.size
    image = preprocess.open_image(record["image"], f"{self.dataset}/{self.class_name} {filename}")
    label = int(record["label"])
    if record["mask"]:
      mask = preprocess.open_image(record["mask"], f"mask of {filename}")
      mask = preprocess.preprocess_mask(mask, self.geometry, self.mask_rule)
    else:
      # No mask file: normal images are defect-free; a defective one's mask is unknown.
      mask = np.full((s, s), np.nan if label else 0.0, np.float32)
    return {
        "image": preprocess.preprocess_image(image, self.geometry),
        "mask": mask,
        "has_mask": not np.isnan(mask[0, 0]),
        "label": np.int32(label),
        "defect_type": record["defect_type"].decode(),
        "filename": filename,
        "index": np.int64(index),
    }

  def __getitem__(self, index: int) -> dict:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    index %= len(self)
    return self.decode(self.read([index])[0], index)


def load_split(dataset: str, root, class_name: str, split: str, *, data_dir,
               image_size: int = 288, resize: int = 288, resize_mode: str = "auto",
               mask_mode: str = "reference") -> Source:
  """Prepares the class if needed (see `builders.prepare`) and returns a split's Source.

  Args:
    dataset: mvtec | visa | mpdd | folder.
    root: raw data folder (the manual directory); "" = use prepared data as it is.
    class_name: one of `classes(dataset)` (folder: a folder of root holding train/good).
    split: train | test.
    data_dir: where prepared datasets are stored.
    image_size: output side S.
    resize: shorter side before the crop (MVTec toothbrush/wood: int(S * 8 / 7) instead).
    resize_mode: auto | crop | stretch (`preprocess.geometry`; auto: crop for mvtec, visa and
      mpdd, stretch for folder).
    mask_mode: reference (the dataset's reference rule) | binary (nearest-neighbour, > 0).
  """
  geometry = preprocess.geometry(dataset, class_name, image_size, resize, resize_mode)
  rule = preprocess.mask_rule(dataset, mask_mode)
  builder = builders.prepare(dataset, root, class_name, data_dir=data_dir)
  if split not in builder.info.splits:
    raise DatasetError(f"{dataset}/{class_name} has no {split!r} split (it has "
                       f"{', '.join(builder.info.splits)}); a folder dataset needs "
                       "<root>/<class>/test/<type>/ for a test split")
  data_source = builder.as_data_source(split, decoders={
      "image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()})
  has_masks = split == "train" or bool(builder.info.metadata["has_masks"])
  return Source(data_source, dataset=dataset, class_name=class_name, split=split,
                geometry=geometry, mask_rule=rule, has_masks=has_masks)


@dataclasses.dataclass(frozen=True)
class CropReport:
  """Defect pixels that a split's geometry drops (the center crop of `resize_mode=crop`).

  count: defective images with a mask that lose mask pixels, of `total` defective images with a
  mask; worst: up to 5 (filename, fraction of its mask pixels lost), largest first; removed:
  filenames whose whole defect is outside the crop (still labelled defective).
  """
  name: str
  geometry: preprocess.Geometry
  count: int
  total: int
  worst: list
  removed: list

  def message(self) -> str:
    """One line for the log and the results notes; "" when no defect pixel is lost."""
    if not self.count:
      return ""
    g = self.geometry
    worst = ", ".join(f"{f} {lost:.1%}" for f, lost in self.worst)
    text = (f"{self.name}: the center crop (dataset.resize_mode=crop: shorter side {g.resize}, "
            f"crop {g.size}) cuts defect pixels from {self.count} of {self.total} defective "
            f"images with masks; most lost: {worst}")
    if self.removed:
      shown = ", ".join(self.removed[:10]) + (" ..." if len(self.removed) > 10 else "")
      text += (f"; the whole defect is cropped away from {len(self.removed)} of them (still "
               f"labelled defective): {shown}")
    return text + ". --config.dataset.resize_mode=stretch keeps the whole image."


def _lost_fraction(mask_bytes: bytes, geo: preprocess.Geometry, name: str) -> float:
  """Fraction of a mask's pixels (native resolution) outside the geometry's kept window."""
  w, h = Image.open(io.BytesIO(mask_bytes)).size  # reads the header only
  rw, rh = geo.resized(w, h)
  left, top, right, bottom = geo.window(w, h)
  # A native pixel is kept when its centre lands inside the window of the resized image.
  x = (np.arange(w) + 0.5) * (rw / w)
  y = (np.arange(h) + 0.5) * (rh / h)
  keep_x, keep_y = (x >= left) & (x < right), (y >= top) & (y < bottom)
  if keep_x.all() and keep_y.all():
    return 0.0
  pixels = preprocess.mask_pixels(preprocess.open_image(mask_bytes, name))
  total = int(pixels.sum())
  return 1.0 - int(pixels[keep_y][:, keep_x].sum()) / total if total else 0.0


def crop_losses(source: Source) -> CropReport:
  """Measures how much of each defective image's mask the geometry drops; decodes only masks
  of images that are actually cropped."""
  losses, total = [], 0
  for start in range(0, len(source), 64):
    for r in source.read(range(start, min(start + 64, len(source)))):
      if int(r["label"]) and r["mask"]:
        total += 1
        name = r["filename"].decode()
        lost = _lost_fraction(r["mask"], source.geometry, f"mask of {name}")
        if lost > 0:
          losses.append((name, lost))
  losses.sort(key=lambda item: -item[1])
  return CropReport(name=f"{source.dataset}/{source.class_name} {source.split}",
                    geometry=source.geometry, count=len(losses), total=total, worst=losses[:5],
                    removed=[f for f, lost in losses if lost >= 1.0])


def subsample_indices(n: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of round(fraction * n) (at least 1) of n examples, drawn without replacement.

  For the training-set subsampling ablation (paper Table VII); pass to `batches(indices=...)`.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"dataset.subsample={fraction} must be in (0, 1]")
  k = max(1, int(round(fraction * n)))
  return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def batches(source: Source, batch_size: int, *, seed: Optional[int] = None,
            indices: Optional[Sequence[int]] = None, rows: Optional[slice] = None,
            num_threads: Optional[int] = None, prefetch: int = 2) -> Iterator[dict]:
  """One pass over `source` in fixed-shape batches, decoded in a thread pool.

  Args:
    source: a Source.
    batch_size: B; the last partial batch is padded to B rows (see `valid`).
    seed: None = in order; else the examples are shuffled with this seed.
    indices: examples to use (e.g. `subsample_indices`); None = all.
    rows: decode and yield only these rows of every batch (a process's own rows of a global
      batch, `sharding.example_rows(mesh, batch_size)`; possibly none); None = all B.
    num_threads: decoding threads; None = min(8, CPU count).
    prefetch: batches decoded ahead of the one being consumed.

  Yields:
    dicts with the fields of `Source` stacked along a leading axis of B rows (image (B, S, S, 3),
    mask (B, S, S), has_mask, label, index, defect_type and filename as numpy str arrays), plus
    valid: (B,) bool, False on padding rows (zero image and mask, label 0, index -1, "" strings).
    With `rows`, only those: row j is row rows.start + j of the batch.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  first, stop, _ = (slice(0, batch_size) if rows is None else rows).indices(batch_size)
  order = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
  if order.size and (order.min() < 0 or order.max() >= len(source)):
    raise ValueError(f"indices must lie in [0, {len(source)}) for {source.dataset}/"
                     f"{source.class_name} {source.split}")
  if seed is not None:
    order = np.random.default_rng(seed).permutation(order)
  chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  pool = concurrent.futures.ThreadPoolExecutor(num_threads or min(8, os.cpu_count() or 1))
  pending = collections.deque()
  try:
    for chunk in chunks:
      mine = chunk[first:stop]
      pending.append([pool.submit(source.decode, r, i) for r, i in zip(source.read(mine), mine)])
      if len(pending) > prefetch:
        yield _stack([f.result() for f in pending.popleft()], stop - first, source.padding())
    while pending:
      yield _stack([f.result() for f in pending.popleft()], stop - first, source.padding())
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _stack(examples: list, rows: int, padding: dict) -> dict:
  """Stacks examples into `rows` rows, padding with `padding` rows marked invalid."""
  full = examples + [padding] * (rows - len(examples))
  out = {}
  for key, pad in padding.items():
    pad = np.asarray(pad)
    out[key] = np.stack([e[key] for e in full]) if full else np.zeros((0, *pad.shape), pad.dtype)
  out["valid"] = np.arange(rows) < len(examples)
  return out
