"""Backbone patch features of a split: extracted once (`extract_split`) and kept on disk for later
runs of the same class (`load_or_extract`).

The backbone is frozen and training has no augmentation, so a split's features are a pure function
of `key_fields`: the prepared data's fingerprint (its source files with sizes and mtimes), the
split and subsample indices, the preprocessing geometry and mask rule, the backbone, the sha256 of
its weights (`backbones.weights_sha256`), layers, patch size and dimensions, the storage dtype
(`train.cache_dtype`), the JAX platform and the versions of JAX and Pillow, a hash of the code that
computes features, and FORMAT. With `train.feature_cache=auto` one file per key holds them:

    <cache dir>/features/<dataset>-<class>-<split>-<digest of the key>.npz     (and its .lock)

and every later run with the same key (a rerun in another workdir, a resume, `eval.only`, an
ablation of the training settings, a sweep task) reads it instead of running the backbone, and
sets its mtime to now: `python -m pbas_jax.cache` (pbas_jax/cache.py) lists entries with their
size and last use and prunes them. Nothing is deleted automatically; a write that fails (a full
disk) is a warning with the size it needed and the space free, and the run goes on.

The file is an uncompressed .npz written to a temporary name and renamed: features (N, H, W, D)
(bfloat16 stored as its uint16 bits, numpy having no bfloat16 of its own), labels (N,), masks
(N, S, S) when the split has them, names, defect types, and the key itself (JSON), which must match.
Reading checks zip's CRC-32 of every member, so a truncated or corrupt file is found; it is
recomputed and replaced, with a warning naming it. Tasks that start together are safe: the first
to miss computes under a file lock (`builders.file_lock`) while the others wait, then read its file.

Heatmap images (the preprocessed test images of `eval.heatmaps` indices) are not stored: they are
decoded again from the prepared data on every run, which costs a few image decodes, so an entry
does not depend on `eval.heatmaps`. Multi-process runs extract without the disk cache (their
processes would all have to take the same hit-or-miss decision).
"""
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any
import zipfile

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL
import tqdm

from pbas_jax import backbones
from pbas_jax import data
from pbas_jax import fileio
from pbas_jax import sharding
from pbas_jax.data import builders

FORMAT = 1
MODES = ("auto", "off")
# The code that turns prepared images into features: any change to it makes new keys.
_CODE = ("features.py", "backbones/*.py", "data/preprocess.py", "data/loader.py")


@dataclasses.dataclass
class Split:
  """One split of a class, with its backbone patch features computed once.

  features: (N, H, W, D) in the cache dtype; labels: (N,); masks: (N, S, S) or None;
  names: N source file names; images: the first few preprocessed images (for heatmap panels).
  """
  features: Any
  labels: np.ndarray
  masks: np.ndarray | None
  names: list[str]
  defect_types: list[str]
  images: np.ndarray


def _store(x: jax.Array, config: ml_collections.ConfigDict) -> Any:
  """Keeps one batch of features in the cache dtype, on device (the engine trains from there)."""
  return x.astype(jnp.bfloat16 if config.train.cache_dtype == "bfloat16" else jnp.float32)


def kept_images(source: data.Source, keep: np.ndarray,
                indices: np.ndarray | None = None) -> np.ndarray:
  """The preprocessed images (K, S, S, 3) of the split's images in `keep`, in split order."""
  order = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
  chosen = order[np.isin(order, keep)]
  images = [batch["image"][batch["valid"]] for batch in data.batches(source, 64, indices=chosen)]
  size = source.geometry.size
  return np.concatenate(images) if images else np.zeros((0, size, size, 3), np.float32)


def extract_split(extractor, source: data.Source, config: ml_collections.ConfigDict,
                  keep: np.ndarray, desc: str, indices: np.ndarray | None = None) -> Split:
  """Runs the frozen backbone once over `source` (ordered) and keeps its patch features.

  `keep` are the indices of the images kept (preprocessed) for heatmap panels; `indices` restricts
  the split to a subset (training-set subsampling).

  Each process decodes only its own rows of every batch of `eval.batch_size` images (those its
  devices hold, `sharding.example_rows` on the run's mesh `sharding.make_mesh()`; with one process,
  all) and the extractor assembles the global batch from them. The Split is complete on every
  process: features are a global array, labels, names and defect types come from the stored
  records, masks are gathered from the processes that decoded them. The heatmap images are
  decoded by process 0 only, which draws them (empty elsewhere).
  """
  bs = config.eval.batch_size
  mesh = sharding.make_mesh()
  mine = sharding.example_rows(mesh, bs)
  meta = source.describe(indices)
  count = len(meta["label"])
  feats, masks = [], []
  for step, batch in enumerate(tqdm.tqdm(
      data.batches(source, bs, indices=indices, rows=mine), desc=desc, unit="batch",
      total=-(-count // bs), leave=False, disable=jax.process_index() != 0)):
    valid = min(bs, count - step * bs)
    feats.append(_store(extractor(batch["image"], global_rows=bs)[:valid], config))
    if source.has_masks:
      masks.append(sharding.to_host(sharding.example_batch(batch["mask"], mesh, bs))[:valid])
  size = source.geometry.size
  images = (kept_images(source, keep, indices) if jax.process_index() == 0
            else np.zeros((0, size, size, 3), np.float32))
  return Split(features=jnp.concatenate(feats), labels=meta["label"],
               masks=np.concatenate(masks) if source.has_masks else None,
               names=[f"{t}/{os.path.splitext(os.path.basename(f))[0]}"
                      for t, f in zip(meta["defect_type"], meta["filename"])],
               defect_types=list(meta["defect_type"]), images=images)


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
  package = pathlib.Path(__file__).parent
  files = sorted(path for pattern in _CODE for path in package.glob(pattern))
  digest = hashlib.sha256()
  for path in files:
    digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()


def key_fields(source: data.Source, config: ml_collections.ConfigDict,
               indices: np.ndarray | None = None) -> dict:
  """Everything that determines the features of `source` (restricted to `indices`), as JSON."""
  b = config.backbone
  fields = {
      "format": FORMAT,
      # The prepared data records its source's fingerprint (`builders.scan`).
      "data": source._data.dataset_info.metadata["fingerprint"],  # pylint: disable=protected-access
      "dataset": source.dataset,
      "class": source.class_name,
      "split": source.split,
      "indices": None if indices is None else hashlib.sha256(
          np.asarray(indices, np.int64).tobytes()).hexdigest(),
      "geometry": dataclasses.asdict(source.geometry),
      "mask_rule": source.mask_rule,
      "backbone": b.name,
      "weights": backbones.weights_sha256(b.name, b.weights, seed=b.seed,
                                          cache_dir=b.cache_dir or None),
      "layers": list(b.layers),
      "patch_size": b.patch_size,
      "pretrain_dim": b.pretrain_dim,
      "target_dim": b.target_dim,
      "dtype": config.train.cache_dtype,
      "platform": jax.default_backend(),
      "versions": {"jax": jax.__version__, "pillow": PIL.__version__},
      "code": _code_hash(),
  }
  return json.loads(json.dumps(fields))  # as read back from the file


# What a change of a `key_fields` field means for the data a split holds. `platform`, `versions`
# and `code` are left out: an upgrade of JAX or of the feature code changes features by rounding,
# the images are the same.
_DATA_FIELDS = {
    "data": "the class's source files (an image or mask added, removed or modified, or the "
            "data root moved)",
    "dataset": "the dataset", "class": "the class", "split": "the split",
    "indices": "the subsample of the training images (dataset.subsample, train.seed)",
    "geometry": "the image geometry", "mask_rule": "the mask rule",
    "backbone": "the backbone", "weights": "the backbone weights' content",
    "layers": "the backbone layers", "patch_size": "the patch size",
    "pretrain_dim": "the feature dimensions", "target_dim": "the feature dimensions",
    "dtype": "the feature storage dtype (train.cache_dtype)",
}


def data_changes(recorded: dict, now: dict) -> list[str]:
  """What differs between two `key_fields` in the data they describe, as phrases (none: [])."""
  return list(dict.fromkeys(what for field, what in _DATA_FIELDS.items()
                            if recorded.get(field) != now.get(field)))


def entry_path(directory: str, fields: dict) -> str:
  """The cache file of `fields` in `directory`."""
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
  return os.path.join(directory,
                      f"{fields['dataset']}-{fields['class']}-{fields['split']}-{digest}.npz")


class _Unreadable(Exception):
  pass


def _read(path: str, fields: dict) -> Split | None:
  """The split stored at `path` (no heatmap images), None when there is no file.

  Raises:
    _Unreadable: the file is truncated, corrupt or holds another key.
  """
  try:
    with np.load(path) as stored:
      meta = json.loads(str(stored["meta"]))
      if meta["fields"] != fields:
        raise _Unreadable(f"feature cache file {path} holds the features of other settings")
      features = stored["features"]
      labels = stored["labels"]
      masks = stored["masks"] if "masks" in stored.files else None
      names, types = stored["names"].tolist(), stored["defect_types"].tolist()
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise _Unreadable(f"feature cache file {path} is truncated or corrupt ({e})") from e
  if not len(features) == len(labels) == len(names):
    raise _Unreadable(f"feature cache file {path} holds {len(features)} features for "
                      f"{len(labels)} images")
  if meta["dtype"] == "bfloat16":
    features = features.view(jnp.bfloat16)
  return Split(features=jnp.asarray(features), labels=labels, masks=masks, names=names,
               defect_types=types, images=np.zeros(0, np.float32))


def _write(path: str, split: Split, fields: dict) -> None:
  """Writes `split` (all but its images) to `path` through a temporary file and a rename."""
  features = sharding.to_host(split.features)
  dtype = str(features.dtype)
  arrays = {
      "features": features.view(np.uint16) if dtype == "bfloat16" else features,
      "labels": split.labels,
      "names": np.array(split.names, str),
      "defect_types": np.array(split.defect_types, str),
      "meta": np.array(json.dumps({"fields": fields, "dtype": dtype})),
  }
  if split.masks is not None:
    arrays["masks"] = split.masks
  needed = sum(np.asarray(a).nbytes for a in arrays.values())
  try:
    fileio.atomic_write(path, lambda f: np.savez(f, **arrays))
  except OSError as e:
    logging.warning(
        "could not write the feature cache file %s (%s): it needs %s, %s; continuing without it "
        "(the next run extracts these features again). `python -m pbas_jax.cache list` shows "
        "what the cache holds, `prune` frees it, $PBAS_JAX_CACHE moves it.", path, e,
        fileio.human_size(needed), _free_space(os.path.dirname(path)))
    return
  logging.info("features of %s/%s %s cached to %s (%s; %s)", fields["dataset"], fields["class"],
               fields["split"], path, fileio.human_size(os.path.getsize(path)),
               _cache_total(os.path.dirname(path)))


def _free_space(folder: str) -> str:
  try:
    return f"{fileio.human_size(shutil.disk_usage(folder).free)} free in {folder}"
  except OSError as e:
    return f"free space in {folder} unknown ({e})"


def _cache_total(folder: str) -> str:
  """What the folder's entries take together, for the log."""
  sizes = [e.stat().st_size for e in os.scandir(folder) if e.name.endswith(".npz")]
  return (f"the feature cache {folder} holds {fileio.human_size(sum(sizes))} in {len(sizes)} "
          "entries; `python -m pbas_jax.cache` lists and prunes them")


def _touch(path: str) -> None:
  """Marks the entry used now: `python -m pbas_jax.cache prune --older_than` goes by last use."""
  try:
    os.utime(path)
  except OSError:
    pass  # a read-only shared cache: its age is then its age


def load_or_extract(extractor, source: data.Source, config: ml_collections.ConfigDict,
                    keep: np.ndarray, desc: str, indices: np.ndarray | None = None, *,
                    directory: str) -> Split:
  """`extract_split`, through the disk cache in `directory` unless `train.feature_cache=off`."""
  if config.train.feature_cache == "off" or jax.process_count() > 1:
    if config.train.feature_cache != "off":
      logging.log_first_n(logging.INFO, "features are not cached on disk in multi-process runs",
                          1)
    return extract_split(extractor, source, config, keep, desc, indices)
  fields = key_fields(source, config, indices)
  path = entry_path(directory, fields)
  try:
    split = _read(path, fields)
  except _Unreadable:
    split = None  # handled under the lock: another task may be replacing it right now
  if split is None:
    os.makedirs(directory, exist_ok=True)
    with builders.file_lock(f"{path}.lock"):
      try:
        split = _read(path, fields)  # another task may have written it meanwhile
      except _Unreadable as e:
        logging.warning("%s; recomputing it", e)
      if split is None:
        split = extract_split(extractor, source, config, keep, desc, indices)
        _write(path, split, fields)
        return split
  logging.info("reused cached features from %s (%s)", path,
               fileio.human_size(os.path.getsize(path)))
  _touch(path)
  split.images = kept_images(source, keep, indices)
  return split
