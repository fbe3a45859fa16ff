"""TFDS builders for MVTec AD, VisA, MPDD and users' own folders (ArrayRecord, no TensorFlow).

The raw data is licence-gated, so each builder reads a manual directory (`root`) the user points
to and writes one builder config per class once, into a folder of `data_dir` that belongs to that
root (`source_dir`: `<data_dir>/<root's name>-<hash of its resolved path>/pbas_<dataset>/<class>`),
so two roots with a class of the same name keep a copy each. `prepare` reuses prepared data while
the source's fingerprint (dataset, class, resolved root, and every file read with its size and
mtime) is unchanged, and prepares again (replacing it) when the source changed. Layout errors
are found before TFDS writes anything; unreadable files are found while writing, inside TFDS's
temporary `incomplete.*` folder, which is removed on error, so no half-prepared data is left.

Layouts (README, "Your own data", walks through the folder layout):

  mvtec, mpdd, folder  <root>/<class>/train/good/*            normal training images (required)
                       <root>/<class>/test/<type>/*           `good` or a defect type
                       <root>/<class>/ground_truth/<type>/<name>_mask.png   (or <name>.png)
                       mvtec and mpdd require test/ and a mask for every defective image. A folder
                       dataset may omit test/ (no test split) or ground_truth/ (no masks: pixel
                       metrics are skipped); with ground_truth/ every defect type needs its masks.
  visa                 <root>/split_csv/1cls.csv with columns object, split, label, image, mask
                       (paths relative to root); train = rows of split `train` labelled `normal`,
                       test = rows of split `test`; every `anomaly` row needs a mask.

Stored example, one per image; image and mask keep their source file's encoded bytes so that any
preprocessing setting reads the same prepared data:

  image        tfds Image: the encoded file (PNG, JPEG, ...), in the file's own mode
  mask         tfds Image: the encoded mask file; b"" when the image has no mask file (normal
               images; defective images of a folder dataset without ground_truth/). Folder
               datasets' masks are stored re-encoded as 'L' 0/255 (> 0 -> 255), so that masks
               saved as 0/1 or in colour follow the reference rules like MVTec's 0/255 masks.
  label        int64: 0 normal, 1 anomalous
  defect_type  "good" for normal images (VisA's `normal` too), else the defect type (VisA:
               "anomaly")
  filename     source path relative to root

Dataset-level metadata (`info.metadata`): fingerprint, root, has_masks (False when defective test
images have no masks).
"""
import concurrent.futures
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import pathlib
import re
from typing import Iterator, Optional

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
import tqdm

from pbas_jax.data import preprocess
from pbas_jax.data.preprocess import DatasetError, DatasetNotFoundError
from pbas_jax.data.preprocess import IMAGE_EXTENSIONS, image_files

CLASSES = {
    "mvtec": ("carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule",
              "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper"),
    "mpdd": ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate",
             "tubes"),
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
             "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"),
}
DATASETS = ("mvtec", "visa", "mpdd", "folder")
# Folder class names become TFDS config names and directory names.
_CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VISA_CSV = os.path.join("split_csv", "1cls.csv")
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
# Files decoded at once while preparing: bounds memory, keeps the thread pool busy.
_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class Record:
  """One image to store: paths relative to the root; mask None = no mask file."""
  image: str
  mask: Optional[str]
  label: int
  defect_type: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a class's raw data holds, found from file names alone (nothing decoded)."""
  dataset: str
  class_name: str
  root: pathlib.Path
  splits: dict  # split name -> list[Record]; "test" absent for a folder class without test/
  has_masks: bool
  fingerprint: str


def classes(dataset: str, root: Optional[str] = None) -> list:
  """Class names of a dataset; for `folder`, the folders of `root` holding train/good."""
  _check_dataset(dataset)
  if dataset != "folder":
    return list(CLASSES[dataset])
  if not root:
    raise DatasetError("the folder dataset's classes are the folders of dataset.root: set it")
  base = _existing_root(root, dataset)
  return sorted(p.name for p in base.iterdir() if (p / "train" / "good").is_dir())


def _check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise DatasetError(f"dataset.name={dataset!r} is not known; choose one of "
                       f"{', '.join(DATASETS)}")


def _existing_root(root, dataset: str) -> pathlib.Path:
  path = pathlib.Path(root).expanduser()
  if not path.is_dir():
    raise DatasetNotFoundError(f"dataset.root {path} does not exist or is not a folder: point it "
                               f"at the extracted {dataset} data")
  return path.resolve()


def _subdirs(folder: pathlib.Path) -> list:
  return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _rel(path: pathlib.Path, root: pathlib.Path) -> str:
  return path.relative_to(root).as_posix()


def _pair_masks(images: list, mask_dir: pathlib.Path, root: pathlib.Path) -> list:
  """Mask path of each image, matched by name: <name>_mask.<ext> or <name>.<ext>."""
  if not mask_dir.is_dir():
    raise DatasetError(
        f"{images[0].parent} has no masks: expected {mask_dir}/<name>_mask.png for each of its "
        "images. Add the ground-truth masks (a folder dataset may instead omit ground_truth/ "
        "entirely: pixel metrics are then skipped)")
  by_name = {}
  for m in image_files(mask_dir):
    name = m.stem[:-len("_mask")] if m.stem.endswith("_mask") else m.stem
    if name in by_name:
      raise DatasetError(f"{by_name[name].name} and {m.name} in {mask_dir} are both masks of "
                         f"image {name}: keep one")
    by_name[name] = m
  missing = [p.name for p in images if p.stem not in by_name]
  orphans = sorted(by_name.keys() - {p.stem for p in images})
  if missing or orphans:
    raise DatasetError(
        f"masks in {mask_dir} do not match the images of {images[0].parent} "
        f"({len(by_name)} masks for {len(images)} images): images without mask: "
        f"{', '.join(missing[:5]) or 'none'}{' ...' if len(missing) > 5 else ''}; masks without "
        f"image: {', '.join(orphans[:5]) or 'none'}{' ...' if len(orphans) > 5 else ''}. Each "
        "image <name>.<ext> needs exactly one mask <name>_mask.png")
  return [_rel(by_name[p.stem], root) for p in images]


def _scan_folders(dataset: str, root: pathlib.Path, class_name: str) -> tuple:
  """Records of the MVTec AD layout (mvtec, mpdd, folder): (splits, has_masks, files read)."""
  base = root / class_name
  train_dir = base / "train" / "good"
  if not train_dir.is_dir():
    raise DatasetError(f"{train_dir} is missing: {dataset} expects the MVTec AD layout "
                       f"<root>/<class>/train/good/*.png (is dataset.root the folder holding the "
                       f"class folders?)")
  train = image_files(train_dir)
  if not train:
    raise DatasetError(f"empty training set: {train_dir} holds no image files "
                       f"({', '.join(IMAGE_EXTENSIONS)})")
  splits = {"train": [Record(_rel(p, root), None, 0, "good") for p in train]}
  test_dir, gt_dir = base / "test", base / "ground_truth"
  masks_required = dataset != "folder"
  if not test_dir.is_dir():
    if masks_required:
      raise DatasetError(f"{test_dir} is missing: {dataset} expects test/<good or defect type>/")
    return splits, False, [*train]
  if masks_required and not gt_dir.is_dir():
    raise DatasetError(f"{gt_dir} is missing: {dataset} needs a mask for every defective test "
                       "image in ground_truth/<defect type>/<name>_mask.png")
  has_masks = gt_dir.is_dir()
  loose = image_files(test_dir)
  if loose:
    raise DatasetError(f"{loose[0]} lies directly in {test_dir}: test images go in "
                       "test/good/ or test/<defect type>/")
  types = _subdirs(test_dir)
  if not types:
    raise DatasetError(f"{test_dir} has no test/<type>/ folders (good or a defect type)")
  test, files = [], [*train]
  for folder in types:
    images = image_files(folder)
    if not images:
      raise DatasetError(f"{folder} holds no image files: remove the folder or add images")
    files += images
    defective = folder.name != "good"
    masks = [None] * len(images)
    if defective and has_masks:
      masks = _pair_masks(images, gt_dir / folder.name, root)
      files += [root / m for m in masks]
    test += [Record(_rel(p, root), m, int(defective), folder.name) for p, m in zip(images, masks)]
  if has_masks:
    orphans = [d.name for d in _subdirs(gt_dir)
               if d.name != "good" and not (test_dir / d.name).is_dir()]
    if orphans:
      raise DatasetError(f"{gt_dir} has masks for defect types without test images: "
                         f"{', '.join(orphans)}; add test/<type>/ or remove those mask folders")
  splits["test"] = test
  only_good = all(r.label == 0 for r in test)
  return splits, has_masks or only_good, files


def _scan_visa(root: pathlib.Path, class_name: str) -> tuple:
  """Records of VisA's 1cls split: (splits, has_masks, files read)."""
  csv_path = root / _VISA_CSV
  if not csv_path.is_file():
    raise DatasetNotFoundError(f"{csv_path} is missing: VisA is read through its split file "
                               "split_csv/1cls.csv (from VisA's download); dataset.root must be "
                               "the folder holding split_csv/ and the class folders")
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in _VISA_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
      raise DatasetError(f"{csv_path} lacks the columns {', '.join(missing)} (needs "
                         f"{', '.join(_VISA_COLUMNS)}): use VisA's split_csv/1cls.csv")
    rows = list(reader)
  mine = [r for r in rows if r["object"] == class_name]
  if not mine:
    found = sorted({r["object"] for r in rows})
    raise DatasetError(f"{csv_path} has no rows for class {class_name!r}; it lists: "
                       f"{', '.join(found) or 'nothing'}")
  splits = {"train": [], "test": []}
  files = [csv_path]
  for r in mine:
    if r["label"] not in ("normal", "anomaly") or r["split"] not in ("train", "test"):
      raise DatasetError(f"{csv_path}: row {r} has label {r['label']!r} / split {r['split']!r}; "
                         "expected normal|anomaly and train|test")
    if r["split"] == "train" and r["label"] != "normal":
      continue  # the reference trains on the normal rows of the train split only
    anomalous = r["label"] == "anomaly"
    mask = r["mask"].strip() or None
    if anomalous and mask is None:
      raise DatasetError(f"{csv_path}: anomalous image {r['image']} has no mask; every anomaly "
                         "row needs its mask path")
    for rel in (r["image"], mask):
      if rel is not None and not (root / rel).is_file():
        raise DatasetNotFoundError(f"{root / rel} (listed in {csv_path}) does not exist: "
                                   "re-extract VisA under dataset.root")
    files += [root / r["image"]] + ([root / mask] if anomalous else [])
    splits[r["split"]].append(Record(r["image"], mask if anomalous else None, int(anomalous),
                                     "anomaly" if anomalous else "good"))
  if not splits["train"]:
    raise DatasetError(f"empty training set: {csv_path} has no normal train rows for class "
                       f"{class_name}")
  if not splits["test"]:
    raise DatasetError(f"{csv_path} has no test rows for class {class_name}")
  return splits, True, files


def scan(dataset: str, root, class_name: str) -> Plan:
  """Checks a class's raw layout and lists its records; raises DatasetError on bad input."""
  _check_dataset(dataset)
  base = _existing_root(root, dataset)
  if dataset == "folder":
    valid = classes(dataset, base)
    if class_name not in valid:
      raise DatasetError(f"class {class_name!r} is not a folder of {base} holding train/good/; "
                         f"classes found: {', '.join(valid) or 'none'}")
    if not _CLASS_NAME.match(class_name):
      raise DatasetError(f"class folder {base / class_name}: rename it to letters, digits, "
                         "'_', '-' and '.' only (the name becomes a TFDS config name)")
  elif class_name not in CLASSES[dataset]:
    raise DatasetError(f"{dataset} has no class {class_name!r}; valid classes: "
                       f"{', '.join(CLASSES[dataset])}")
  elif dataset != "visa" and not (base / class_name).is_dir():
    found = [p.name for p in _subdirs(base)]
    raise DatasetNotFoundError(f"class folder {base / class_name} does not exist (found: "
                               f"{', '.join(found[:20]) or 'nothing'}): dataset.root must be the "
                               f"folder holding the {dataset} class folders")
  if dataset == "visa":
    splits, has_masks, files = _scan_visa(base, class_name)
  else:
    splits, has_masks, files = _scan_folders(dataset, base, class_name)
  listing = []
  for f in files:
    st = f.stat()
    listing.append((_rel(f, base), st.st_size, st.st_mtime_ns))
  payload = json.dumps([dataset, class_name, str(_BaseBuilder.VERSION), str(base), listing])
  fingerprint = hashlib.sha256(payload.encode()).hexdigest()
  return Plan(dataset, class_name, base, splits, has_masks, fingerprint)


def _binarized_png(mask: Image.Image) -> bytes:
  """'L' 0/255 PNG of a mask in any mode (> 0 -> 255)."""
  buffer = io.BytesIO()
  Image.fromarray(preprocess.mask_pixels(mask).astype(np.uint8) * 255, "L").save(buffer, "png")
  return buffer.getvalue()


def _read_checked(root: pathlib.Path, record: Record, binarize_mask: bool) -> tuple:
  """Reads and fully decodes an image and its mask, checking sizes: (image bytes, mask bytes)."""
  image_path = root / record.image
  image_bytes = image_path.read_bytes()
  image = preprocess.open_image(image_bytes, str(image_path))
  if record.mask is None:
    return image_bytes, b""
  mask_path = root / record.mask
  mask_bytes = mask_path.read_bytes()
  mask = preprocess.open_image(mask_bytes, str(mask_path))
  if mask.size != image.size:
    raise DatasetError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                       f"{image_path} is {image.size[0]}x{image.size[1]}: a mask must have its "
                       "image's size")
  return image_bytes, _binarized_png(mask) if binarize_mask else mask_bytes


class _BaseBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared by all datasets: features, splits, checked reading. Subclasses set DATASET."""

  DATASET = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded source images and masks, label, defect type, file name."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download and extract the dataset yourself (licence-gated) and pass the extracted folder as "
      "the manual directory (pbas_jax: dataset.root). Layouts: pbas_jax/data/builders.py.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds this path through `importlib_resources` (a backport it only installs on
    # Python < 3.9) for builders defined inside a package; this file is the answer.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET} class {self.builder_config.name} for anomaly detection.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "mask": tfds.features.Image(shape=(None, None, 1)),
            "label": np.int64,
            "defect_type": tfds.features.Text(),
            "filename": tfds.features.Text(),
        }),
        # Keep the scan's order (sorted files; VisA: csv rows) for ordered evaluation and
        # reproducible seeded shuffles.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    plan = scan(self.DATASET, dl_manager.manual_dir, self.builder_config.name)
    self.info.metadata.update(fingerprint=plan.fingerprint, root=str(plan.root),
                              has_masks=plan.has_masks)
    return {split: self._generate_examples(plan.root, records, split)
            for split, records in plan.splits.items()}

  def _generate_examples(self, root: pathlib.Path, records: list, split: str) -> Iterator:
    binarize = self.DATASET == "folder"
    bar = tqdm.tqdm(total=len(records), unit="image", leave=False,
                    desc=f"preparing {self.DATASET}/{self.builder_config.name} {split}")
    with bar, concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      for start in range(0, len(records), _CHUNK):
        chunk = records[start:start + _CHUNK]
        checked = pool.map(lambda r: _read_checked(root, r, binarize), chunk)
        for r, (image, mask) in zip(chunk, checked):
          bar.update()
          yield r.image, {"image": image, "mask": mask, "label": r.label,
                          "defect_type": r.defect_type, "filename": r.image}

  # TFDS prints "Downloading and preparing dataset Unknown size (download: Unknown size, ...)" and
  # "Subsequent calls will reuse this data" around every build; nothing is downloaded here (the
  # source is a local folder) and `prepare` logs what happens instead.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


def _configs(dataset: str) -> list:
  return [tfds.core.BuilderConfig(name=c) for c in CLASSES[dataset]]


class PbasMvtec(_BaseBuilder):
  """MVTec AD (Bergmann et al., CVPR 2019), one config per class."""
  DATASET = "mvtec"
  BUILDER_CONFIGS = _configs("mvtec")


class PbasMpdd(_BaseBuilder):
  """MPDD (Jezek et al., 2021), MVTec AD layout, one config per class."""
  DATASET = "mpdd"
  BUILDER_CONFIGS = _configs("mpdd")


class PbasVisa(_BaseBuilder):
  """VisA (Zou et al., ECCV 2022), 1cls split, one config per class."""
  DATASET = "visa"
  BUILDER_CONFIGS = _configs("visa")


class PbasFolder(_BaseBuilder):
  """Users' own data in the MVTec AD layout; one config per class folder of the root."""
  DATASET = "folder"

  @classmethod
  def get_builder_config(cls, name: str, version=None) -> tfds.core.BuilderConfig:
    # The classes are the user's folders, unknown here: any name asked for is a config.
    return tfds.core.BuilderConfig(name=name)


BUILDERS = {"mvtec": PbasMvtec, "mpdd": PbasMpdd, "visa": PbasVisa, "folder": PbasFolder}


def source_dir(data_dir, root) -> str:
  """The folder of `data_dir` holding the data prepared from `root` (the resolved path's hash
  tells apart roots with the same name)."""
  resolved = pathlib.Path(root).expanduser().resolve()
  digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
  return os.path.join(os.fspath(data_dir), f"{resolved.name or 'root'}-{digest}")


def builder(dataset: str, class_name: str, data_dir) -> tfds.core.DatasetBuilder:
  """The builder of one class in `data_dir` (a `source_dir`), prepared or not."""
  _check_dataset(dataset)
  return BUILDERS[dataset](config=class_name, data_dir=os.fspath(data_dir),
                           file_format="array_record")


def _is_prepared(b: tfds.core.DatasetBuilder) -> bool:
  # `is_prepared` alone logs a warning for a folder that does not exist yet.
  return b.data_path.exists() and b.is_prepared()


def prepare(dataset: str, root, class_name: str, *, data_dir) -> tfds.core.DatasetBuilder:
  """Prepares one class from `root` into `source_dir(data_dir, root)` unless up to date; returns
  its builder.

  With an empty `root` the prepared data is used as it is (no raw data needed), if `data_dir`
  holds the class prepared from one root only.
  """
  if not data_dir:
    raise DatasetError("dataset.data_dir is empty: set where prepared datasets are stored")
  if not root:
    return _only_prepared(dataset, class_name, data_dir)
  plan = scan(dataset, root, class_name)
  # Sweep tasks of one class start together and share data_dir: one prepares, the others wait and
  # then find the data prepared.
  directory = source_dir(data_dir, plan.root)
  os.makedirs(directory, exist_ok=True)
  with file_lock(os.path.join(directory, f".{dataset}_{class_name}.lock")):
    return _prepare_locked(dataset, class_name, directory, plan)


def _only_prepared(dataset: str, class_name: str, data_dir) -> tfds.core.DatasetBuilder:
  """The one prepared copy of the class in `data_dir` (whatever root it came from)."""
  found = []
  if os.path.isdir(data_dir):
    for entry in sorted(os.scandir(data_dir), key=lambda e: e.name):
      if entry.is_dir() and os.path.isdir(os.path.join(entry.path, f"pbas_{dataset}", class_name)):
        b = builder(dataset, class_name, entry.path)
        if _is_prepared(b):
          found.append(b)
  if not found:
    raise DatasetNotFoundError(f"{dataset}/{class_name} is not prepared in {data_dir} and "
                               "dataset.root is empty: set dataset.root to the raw data")
  if len(found) > 1:
    roots = ", ".join(str(b.info.metadata.get("root")) for b in found)
    raise DatasetError(f"{dataset}/{class_name} is prepared in {data_dir} from {len(found)} roots "
                       f"({roots}) and dataset.root is empty: set dataset.root to the one meant")
  return found[0]


@contextlib.contextmanager
def file_lock(path) -> Iterator[None]:
  """Holds an exclusive lock on the file `path` (made if missing) while the block runs.

  Excludes other processes (other hosts too where the file system supports flock, as NFS does) and
  other threads, each of which opens the file itself.
  """
  with open(path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _prepare_locked(dataset, class_name, data_dir, plan) -> tfds.core.DatasetBuilder:
  b = builder(dataset, class_name, data_dir)
  if _is_prepared(b):
    if b.info.metadata.get("fingerprint") == plan.fingerprint:
      return b
    logging.warning("%s/%s in %s was prepared from other versions of the files of %s (a file "
                    "was added, removed or changed); preparing it again", dataset, class_name,
                    data_dir, plan.root)
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  else:
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  logging.info("preparing %s/%s from %s into %s (once; later runs reuse it)", dataset,
               class_name, plan.root, b.data_dir)
  with _tfds_bars_off():
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(plan.root), download_mode=mode))
  # A fresh builder reads back what was written, metadata included.
  return builder(dataset, class_name, data_dir)


@contextlib.contextmanager
def _tfds_bars_off():
  """TFDS's progress bars (one per split, plus "Shuffling <long temporary path>") are replaced by
  one bar per split of `_generate_examples`; real warnings still go through logging."""
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.enable_progress_bar()
