"""The persistent feature cache: hits equal recomputation, every key field matters, damaged files
are recomputed, concurrent tasks share one entry, and a second run of a class extracts nothing."""
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import PIL
import pytest

import data_trees
from pbas_jax import backbones
from pbas_jax import config_base
from pbas_jax import data
from pbas_jax import feature_cache
from pbas_jax import fileio
from pbas_jax import features as features_lib
from pbas_jax import report
from pbas_jax import sharding
from pbas_jax.backbones import weights as weights_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _noise_tree(root: pathlib.Path, classes=("bottle",)) -> pathlib.Path:
  """Tiny non-square classes whose images differ (noise), so their features differ."""
  rng = np.random.default_rng(0)
  for name in classes:
    data_trees.mvtec_tree(root, name, n_train=5, test=(("good", 2), ("crack", 3)), size=(40, 32))
    for path in sorted(root.glob(f"{name}/*/*/*.png")):
      if "ground_truth" not in path.parts:
        data_trees.write_image(path, rng.integers(0, 255, (32, 40, 3)))
  return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(config, extractor) of a folder dataset, smoke settings, random resnet18 at 32 px."""
  base = tmp_path_factory.mktemp("cache_setup")
  config = config_base.load(str(REPO / "configs" / "mvtec.py:smoke"))
  config.dataset.name = "folder"
  config.dataset.root = str(_noise_tree(base / "raw", ("bottle", "cable")))
  config.dataset.data_dir = str(base / "tfds")
  config.dataset.image_size = config.dataset.resize = 32
  config.dataset.resize_mode = "stretch"
  config.backbone.name = "resnet18"
  config.backbone.cache_dir = str(base / "weights")
  config.backbone.pretrain_dim = config.backbone.target_dim = 64
  config.eval.batch_size = 4
  extractor = features_lib.extractor_of(config, sharding.make_mesh(jax.devices()[:1]))
  return config, extractor


def _source(config, split="test", class_name="bottle") -> data.Source:
  d = config.dataset
  return data.load_split(d.name, d.root, class_name, split, data_dir=d.data_dir,
                         image_size=d.image_size, resize=d.resize, resize_mode=d.resize_mode,
                         mask_mode=d.mask_mode)


class Counting:
  """The extractor, counting the backbone batches it runs (and optionally slow, to overlap
  calls)."""

  def __init__(self, extractor, delay: float = 0.0):
    self.extractor, self.delay, self.batches = extractor, delay, 0
    self.lock = threading.Lock()

  def __call__(self, images, **kwargs):
    with self.lock:
      self.batches += 1
    time.sleep(self.delay)
    return self.extractor(images, **kwargs)


def _batches(n: int, config) -> int:
  """Backbone batches that extracting n images takes."""
  return -(-n // config.eval.batch_size)


def _assert_same(a: feature_cache.Split, b: feature_cache.Split) -> None:
  """Equal bit for bit (NaN masks included), same dtypes and shapes."""
  fa, fb = np.asarray(a.features), np.asarray(b.features)
  assert fa.dtype == fb.dtype and fa.shape == fb.shape
  assert fa.tobytes() == fb.tobytes()
  for x, y in ((a.labels, b.labels), (a.masks, b.masks), (a.images, b.images)):
    assert (x is None) == (y is None)
    if x is not None:
      assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
  assert a.names == b.names and a.defect_types == b.defect_types


def _entries(directory: pathlib.Path) -> list:
  return sorted(p.name for p in directory.glob("*")) if directory.exists() else []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hit_equals_recomputation_bit_for_bit(setup, tmp_path, caplog, dtype):
  config, extractor = setup
  config = config.copy_and_resolve_references()
  config.train.cache_dtype = dtype
  source = _source(config)
  keep = np.array([1, 3])
  counting = Counting(extractor)
  caplog.set_level(logging.INFO)

  written = feature_cache.load_or_extract(counting, source, config, keep, "test",
                                          directory=str(tmp_path))
  assert counting.batches == _batches(len(source), config)
  (path,) = tmp_path.glob("*.npz")
  assert f"bottle test cached to {path} (" in caplog.text

  caplog.clear()
  hit = feature_cache.load_or_extract(counting, source, config, keep, "test",
                                      directory=str(tmp_path))
  assert counting.batches == _batches(len(source), config)  # the backbone did not run again
  assert f"reused cached features from {path}" in caplog.text
  recomputed = feature_cache.extract_split(extractor, source, config, keep, "test")
  assert np.asarray(recomputed.features).dtype == np.dtype(jax.numpy.bfloat16 if dtype ==
                                                           "bfloat16" else np.float32)
  assert recomputed.masks is not None and len(recomputed.images) == 2
  _assert_same(written, recomputed)
  _assert_same(hit, recomputed)
  assert isinstance(hit.features, jax.Array)


def test_subsampled_train_split_and_other_keep(setup, tmp_path):
  """A subset has its own entry; heatmap images follow `keep`, which is not part of the key."""
  config, extractor = setup
  source = _source(config, "train")
  subset = data.subsample_indices(len(source), 0.6, seed=0)
  counting = Counting(extractor)
  first = feature_cache.load_or_extract(counting, source, config, np.zeros(0, int), "train",
                                        subset, directory=str(tmp_path))
  assert counting.batches == _batches(len(subset), config)
  assert len(first.labels) == len(subset) < len(source)
  keep = subset[:1]
  again = feature_cache.load_or_extract(counting, source, config, keep, "train", subset,
                                        directory=str(tmp_path))
  assert counting.batches == _batches(len(subset), config)
  _assert_same(again, feature_cache.extract_split(extractor, source, config, keep, "train",
                                                  subset))
  feature_cache.load_or_extract(counting, source, config, keep, "train",
                                directory=str(tmp_path))
  # The whole split is another entry.
  assert counting.batches == _batches(len(subset), config) + _batches(len(source), config)
  assert len(_entries(tmp_path)) == 4  # two entries, each with its lock file


def _set(key: str, value):
  def change(config, _):
    section, name = key.split(".")
    config[section][name] = value
  return change


def _patch(target, name: str, value):
  def change(_, monkeypatch):
    monkeypatch.setattr(target, name, value)
  return change


def _converted_weights(config, _):
  """Weights from a converted file: keyed by the file's sha256 (see the test for a new file)."""
  b = config.backbone
  b.weights = "IMAGENET1K_V1"
  weights_lib.save_variables(weights_lib.weights_path(b.name, b.weights, cache_dir=b.cache_dir),
                             {"params": {"w": np.zeros(3)}}, {})


# field of `key_fields` -> a change of the settings, the split or the environment that must change
# it (and only it, apart from `also`); `data` (the source files) has its own test below.
CHANGES = [
    ("dataset", _set("dataset.name", "mvtec"), {"data", "mask_rule", "geometry"}),
    ("class", lambda c, _: {"class_name": "cable"}, {"data"}),
    ("split", lambda c, _: {"split": "train"}, set()),
    ("indices", lambda c, _: {"indices": np.array([0, 2])}, set()),
    ("geometry", _set("dataset.image_size", 24), set()),
    ("geometry", _set("dataset.resize_mode", "crop"), set()),
    ("mask_rule", _set("dataset.mask_mode", "binary"), set()),
    ("backbone", _set("backbone.name", "efficientnet_lite0"), {"weights"}),
    ("weights", _set("backbone.seed", 1), set()),
    ("weights", _converted_weights, set()),
    ("layers", _set("backbone.layers", ("layer2",)), set()),
    ("patch_size", _set("backbone.patch_size", 1), set()),
    ("pretrain_dim", _set("backbone.pretrain_dim", 32), set()),
    ("target_dim", _set("backbone.target_dim", 32), set()),
    ("dtype", _set("train.cache_dtype", "bfloat16"), set()),
    ("format", _patch(feature_cache, "FORMAT", feature_cache.FORMAT + 1), set()),
    ("platform", _patch(jax, "default_backend", lambda: "tpu"), set()),
    ("versions", _patch(PIL, "__version__", "0.0"), set()),
    ("code", _patch(feature_cache, "_code_hash", lambda: "other code"), set()),
]


def _fields(config, split="test", class_name="bottle", indices=None) -> dict:
  return feature_cache.key_fields(_source(config, split, class_name), config, indices)


@pytest.mark.parametrize("field,change,also", CHANGES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CHANGES)])
def test_every_key_field_changes_the_entry(setup, monkeypatch, field, change, also):
  config = setup[0].copy_and_resolve_references()
  before = _fields(config)
  changed = config.copy_and_resolve_references()
  after = _fields(changed, **(change(changed, monkeypatch) or {}))
  differ = {k for k in before if before[k] != after[k]}
  assert field in differ and differ <= {field} | also, differ
  directory = "/cache/features"
  assert feature_cache.entry_path(directory, before) != feature_cache.entry_path(directory, after)


def test_the_changes_cover_every_key_field(setup):
  assert {c[0] for c in CHANGES} | {"data"} == set(_fields(setup[0]))


def test_changed_source_files_and_converted_weights_change_the_key(setup, tmp_path):
  config = setup[0].copy_and_resolve_references()
  config.dataset.root = str(shutil.copytree(config.dataset.root, tmp_path / "raw"))
  config.dataset.data_dir = str(tmp_path / "tfds")
  before = _fields(config)
  image = tmp_path / "raw" / "bottle" / "test" / "good" / "000.png"
  data_trees.write_image(image, np.zeros((32, 40, 3)))
  os.utime(image, ns=(1, 1))  # another file content, whatever the clock says
  after = _fields(config)
  assert {k for k in before if before[k] != after[k]} == {"data"}

  _converted_weights(config, None)
  first = _fields(config)["weights"]
  assert first == backbones.weights_sha256(config.backbone.name, config.backbone.weights,
                                          cache_dir=config.backbone.cache_dir)
  weights_lib.save_variables(
      weights_lib.weights_path(config.backbone.name, config.backbone.weights,
                               cache_dir=config.backbone.cache_dir),
      {"params": {"w": np.ones(3)}}, {})
  assert _fields(config)["weights"] != first


def test_another_setting_misses_and_keeps_both_entries(setup, tmp_path):
  config, extractor = setup
  source = _source(config)
  counting = Counting(extractor)
  feature_cache.load_or_extract(counting, source, config, np.zeros(0, int), "test",
                                directory=str(tmp_path))
  other = config.copy_and_resolve_references()
  other.train.cache_dtype = "bfloat16"
  feature_cache.load_or_extract(counting, source, other, np.zeros(0, int), "test",
                                directory=str(tmp_path))
  assert counting.batches == 2 * _batches(len(source), config)
  assert len(list(tmp_path.glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "other key"])
def test_damaged_file_is_named_recomputed_and_replaced(setup, tmp_path, caplog, damage):
  config, extractor = setup
  source = _source(config)
  counting = Counting(extractor)
  good = feature_cache.load_or_extract(counting, source, config, np.zeros(0, int), "test",
                                       directory=str(tmp_path))
  (path,) = tmp_path.glob("*.npz")
  blob = path.read_bytes()
  if damage == "truncated":
    path.write_bytes(blob[:len(blob) // 2])
  elif damage == "flipped byte":  # inside the features, the first and largest member
    path.write_bytes(blob[:len(blob) // 3] + bytes([blob[len(blob) // 3] ^ 1])
                     + blob[len(blob) // 3 + 1:])
  else:  # a file of other settings under this name (a copied cache, a digest collision)
    other = config.copy_and_resolve_references()
    other.backbone.seed = 7
    feature_cache.load_or_extract(counting, source, other, np.zeros(0, int), "test",
                                  directory=str(tmp_path))
    shutil.copy(feature_cache.entry_path(str(tmp_path), feature_cache.key_fields(source, other)),
                path)
  extracted = counting.batches
  caplog.set_level(logging.INFO)

  again = feature_cache.load_or_extract(counting, source, config, np.zeros(0, int), "test",
                                        directory=str(tmp_path))
  assert counting.batches == extracted + _batches(len(source), config)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and str(path) in warnings[0] and "recomputing" in warnings[0]
  _assert_same(again, good)
  caplog.clear()
  feature_cache.load_or_extract(counting, source, config, np.zeros(0, int), "test",
                                directory=str(tmp_path))
  assert counting.batches == extracted + _batches(len(source), config)  # the new file is good
  assert "reused cached features" in caplog.text


def test_concurrent_tasks_extract_once_and_share_one_entry(setup, tmp_path):
  config, extractor = setup
  source = _source(config)
  extractor(source[0]["image"][None])  # compiled before the race
  counting = Counting(extractor, delay=0.3)
  results, errors = [None, None], []

  def task(i):
    try:
      results[i] = feature_cache.load_or_extract(counting, source, config, np.array([0]), "test",
                                                 directory=str(tmp_path))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=task, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  # One extracted, the other waited and read its file.
  assert counting.batches == _batches(len(source), config)
  _assert_same(results[0], results[1])
  assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob("*.tmp"))


def test_off_extracts_and_writes_nothing(setup, tmp_path):
  config, extractor = setup
  config = config.copy_and_resolve_references()
  config.train.feature_cache = "off"
  counting = Counting(extractor)
  for _ in range(2):
    feature_cache.load_or_extract(counting, _source(config), config, np.zeros(0, int), "test",
                                  directory=str(tmp_path / "features"))
  assert counting.batches == 2 * _batches(len(_source(config)), config)
  assert not (tmp_path / "features").exists()


@pytest.mark.slow
def test_second_run_of_a_class_extracts_nothing_and_gives_identical_results(tmp_path):
  """Issue 13's check through the main job: a new workdir, the same class and settings."""
  root = _noise_tree(tmp_path / "raw")
  env = dict(os.environ, PBAS_JAX_CACHE=str(tmp_path / "cache"))
  procs, rows = [], []
  for run in ("first", "second"):
    cmd = [sys.executable, "-m", "pbas_jax.main", "--config=configs/mvtec.py:smoke",
           f"--workdir={tmp_path / run}", f"--config.dataset.root={root}",
           f"--config.dataset.data_dir={tmp_path / 'tfds'}", "--config.dataset.classes=bottle",
           "--config.backbone.name=resnet18"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    procs.append(proc)
    rows.append(json.loads((tmp_path / run / "results.json").read_text())["rows"][0])
  first, second = (p.stderr for p in procs)
  cached = sorted((tmp_path / "cache" / "features").glob("*.npz"))
  assert len(cached) == 2  # test and train split
  for path in cached:
    split = "train" if "-train-" in path.name else "test"
    size = fileio.human_size(path.stat().st_size)
    assert f"features of mvtec/bottle {split} cached to {path} ({size}; the feature cache" in first
    assert f"reused cached features from {path} ({size})" in second
  assert "bottle test features" in first and "bottle train features" in first  # progress bars
  assert " cached to " not in second
  assert "bottle test features" not in second and "bottle train features" not in second
  for key in (*report.METRIC_KEYS, "epoch"):
    assert rows[1][key] == rows[0][key], key
