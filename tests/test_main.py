"""The main job end to end: `python -m pbas_jax.main` with the smoke preset, resume, config errors."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import data_trees
from pbas_jax import checkpoint
from pbas_jax import config_base
from pbas_jax import data
from pbas_jax import engine
from pbas_jax import experiment
from pbas_jax import feature_cache
from pbas_jax import features as features_lib
from pbas_jax import memory
from pbas_jax import report
from pbas_jax import sharding
from pbas_jax import trained

REPO = pathlib.Path(__file__).resolve().parents[1]
# resnet18 compiles several times faster than the default WRN50; the real-data test keeps WRN50.
FAST = ("--config.backbone.name=resnet18",)


def _tree(root: pathlib.Path) -> pathlib.Path:
  """A tiny MVTec-layout class whose images differ (noise), so features and scores vary."""
  return data_trees.noisy_mvtec_tree(root, n_train=10, test=(("good", 3), ("crack", 3)), size=(48, 48))


def run_main(workdir, root, *overrides, env=None, check=True, config="configs/mvtec.py:smoke"):
  cmd = [sys.executable, "-m", "pbas_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.dataset.root={root}", f"--config.dataset.data_dir={workdir}/../tfds",
         *overrides]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def load_model(class_dir: pathlib.Path, config, features_shape):
  template = engine.unstack(engine.state_template(config, engine.runs_of(config),
                                                  features_shape))[0]
  return checkpoint.Checkpointer(class_dir / "model").restore(template)


def smoke_config(**changes):
  config = config_base.load(str(REPO / "configs" / "mvtec.py:smoke"))
  config.backbone.name = "resnet18"
  return config_base.apply_overrides(config, changes)


def _check_outputs(workdir: pathlib.Path, class_dir: str, n_heatmaps: int):
  results = json.loads((workdir / "results.json").read_text())
  row = results["rows"][0]
  for key in report.METRIC_KEYS:
    assert 0.0 <= row[key] <= 1.0, (key, row[key])
  assert results["selection"] == "last"
  assert any("random" in n for n in results["notes"])
  csv_text = (workdir / "results.csv").read_text()
  assert class_dir.split("_", 1)[1] in csv_text and "mean" in csv_text
  heatmaps = sorted((workdir / class_dir / "heatmaps").glob("*.png"))
  assert len(heatmaps) == n_heatmaps
  assert (workdir / class_dir / "model").is_dir()
  assert (workdir / class_dir / "checkpoints").is_dir()
  lines = (workdir / class_dir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["epoch"] for line in lines] == list(range(1, len(lines) + 1))
  assert list((workdir / class_dir / "tensorboard").glob("events*"))  # curves for TensorBoard
  # eval.every_epochs=0: the final evaluation is the reported epoch's line.
  last = json.loads(lines[row["epoch"] - 1])
  assert {key: last[f"test_{key}"] for key in report.METRIC_KEYS} == {
      key: row[key] for key in report.METRIC_KEYS}
  return row


def test_smoke_end_to_end_and_finished_class_is_skipped(tmp_path):
  root = _tree(tmp_path / "raw")
  workdir = tmp_path / "run"
  proc = run_main(workdir, root, *FAST, "--config.dataset.classes=bottle")
  assert "I-AUROC" in proc.stdout and "bottle" in proc.stdout
  row = _check_outputs(workdir, "mvtec_bottle", n_heatmaps=4)
  assert row["epoch"] == 3
  assert json.loads((workdir / "config.json").read_text())["train"]["epochs"] == 3

  # The same command again: the finished class is read back, not retrained.
  mtime = (workdir / "mvtec_bottle" / "results.json").stat().st_mtime_ns
  again = run_main(workdir, root, *FAST, "--config.dataset.classes=bottle")
  assert "is finished" in again.stderr
  assert (workdir / "mvtec_bottle" / "results.json").stat().st_mtime_ns == mtime
  assert json.loads((workdir / "results.json").read_text())["rows"][0] == row

  # Evaluation only: loads the trained model and reproduces its numbers.
  run_main(workdir, root, *FAST, "--config.dataset.classes=bottle", "--config.eval.only=True")
  evaluated = json.loads((workdir / "mvtec_bottle" / "results.json").read_text())["rows"][0]
  for key in report.METRIC_KEYS:
    assert evaluated[key] == pytest.approx(row[key], abs=1e-6)

  # predict: unlabelled images scored by the trained model, as the evaluation scored them.
  out = tmp_path / "predicted"
  names, _, skipped = trained.predict_folder(
      str(workdir), "bottle", str(root / "bottle" / "test" / "crack"), str(out), heatmaps=2)
  assert names == ["000.png", "001.png", "002.png"] and not skipped
  lines = (out / "scores.csv").read_text().splitlines()
  assert lines[0] == "file,score,anomalous,defect_pixels,skipped" and len(lines) == 4
  assert len(list((out / "heatmaps").glob("*.png"))) == 2
  with pytest.raises(FileNotFoundError, match="no image files"):
    trained.predict_folder(str(workdir), "bottle", str(tmp_path / "empty"), str(out))
  # A class without a trained model: the error names where it looked; nothing is created.
  with pytest.raises(FileNotFoundError, match=re.escape(str(workdir / "mvtec_cable" / "model"))):
    trained.predict_folder(str(workdir), "cable", str(root / "bottle" / "test" / "crack"),
                           str(tmp_path / "nothing"))
  assert not (workdir / "mvtec_cable").exists() and not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_smoke_on_real_mpdd_metal_plate(tmp_path, mpdd_root):
  """The issue's command, with the default WRN50 (random weights) on the real MPDD class."""
  workdir = tmp_path / "run"
  run_main(workdir, mpdd_root, "--config.dataset.classes=metal_plate", config="configs/mpdd.py:smoke")
  row = _check_outputs(workdir, "mpdd_metal_plate", n_heatmaps=4)
  assert row["dataset"] == "mpdd" and row["class"] == "metal_plate"


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  root = _tree(tmp_path / "raw")
  args = (*FAST, "--config.dataset.classes=bottle", "--config.train.epochs=40",
          "--config.train.checkpoint_every=1", "--config.eval.heatmaps=0")
  straight = tmp_path / "straight"
  run_main(straight, root, *args)

  killed = tmp_path / "killed"
  cmd = [sys.executable, "-m", "pbas_jax.main", "--config=configs/mvtec.py:smoke",
         f"--workdir={killed}", f"--config.dataset.root={root}",
         f"--config.dataset.data_dir={tmp_path}/tfds", *args]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = killed / "mvtec_bottle" / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
    if done and max(done) >= 3:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed mid-training"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed / "mvtec_bottle" / "results.json").exists()
  interrupted_at = max(int(p.name) for p in ckpts.glob("*") if p.name.isdigit())
  assert 3 <= interrupted_at < 40

  run_main(killed, root, *args)
  config = smoke_config()
  grid = 64 // 8  # smoke images are 64 px; layer2 has stride 8
  shape = (grid, grid, config.backbone.target_dim)
  a, meta_a = load_model(straight / "mvtec_bottle", config, shape)
  b, meta_b = load_model(killed / "mvtec_bottle", config, shape)
  assert meta_a["epoch"] == meta_b["epoch"] == 40
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  epochs = [json.loads(l)["epoch"] for l in
            (killed / "mvtec_bottle" / "metrics.jsonl").read_text().splitlines()]
  assert epochs == list(range(1, 41))


def test_cached_features_equal_features_recomputed_in_another_order(tmp_path):
  """The cache runs the backbone once, in split order and batches of eval.batch_size (4, the last
  one padded); the reference recomputes the features of every shuffled training batch. Recomputed
  here in a shuffled order in batches of 3, they are the same up to float rounding (XLA rounds
  another batch shape differently), each in its own image's place.

  (Training from the two is not compared: Adam turns rounding-level gradient differences of
  near-zero components into parameter differences of up to the learning rate per step.)"""
  root = _tree(tmp_path / "raw")
  config = smoke_config(**{"dataset.root": str(root), "eval.batch_size": 4})
  source = data.load_split("mvtec", root, "bottle", "train", data_dir=tmp_path / "tfds",
                           image_size=64, resize=64)
  extractor = features_lib.extractor_of(config, sharding.make_mesh(jax.devices()[:1]))
  cached = feature_cache.extract_split(extractor, source, config, np.zeros(0, int), "train")
  order = np.random.default_rng(0).permutation(len(source))
  recomputed = np.zeros(cached.features.shape, np.float32)
  for chunk in np.array_split(order, range(3, len(order), 3)):
    recomputed[chunk] = extractor(np.stack([source[int(i)]["image"] for i in chunk]))
  np.testing.assert_allclose(recomputed, np.asarray(cached.features), rtol=1e-5, atol=1e-5)
  assert np.abs(recomputed - recomputed[order]).max() > 1e-2  # a misplaced image would show


def test_unknown_config_key_fails_with_a_suggestion(tmp_path):
  proc = run_main(tmp_path / "run", tmp_path, "--config.train.epoch=5", check=False)
  assert proc.returncode != 0
  assert proc.stderr.splitlines() == [
      "FATAL Flags parsing error: --config.train.epoch: the config has no key 'epoch'. "
      'Did you mean "epochs" instead of "epoch"?']
  assert not (tmp_path / "run").exists()
  proc = run_main(tmp_path / "run", tmp_path, "--config.trian.xyzzy=5", check=False)
  assert proc.returncode != 0
  assert proc.stderr.splitlines() == [
      "FATAL Flags parsing error: --config.trian.xyzzy: the config has no key 'trian'. "
      'Did you mean "train" instead of "trian"?']


@pytest.mark.parametrize("key,value,message", [
    ("model.synthesis", "noise", "--config.model.synthesis='noise' is not valid"),
    ("eval.selection", "best", "--config.eval.selection='best' is not valid"),
    ("train.epochs", 0, "--config.train.epochs must be positive"),
    ("dataset.subsample", 1.5, "--config.dataset.subsample must be in (0, 1]"),
    ("dataset.root", "", "--config.dataset.root is empty"),
    ("train.checkpoint_every", 0, "--config.train.checkpoint_every must be positive"),
    ("eval.every_epochs", 5, "--config.eval.every_epochs=5 is larger than --config.train.epochs=3"),
    ("model.bce", "logits", "--config.model.bce='logits' is not valid"),
    ("train.compute_dtype", "float16", "--config.train.compute_dtype='float16' is not valid"),
    ("train.param_ema", 1.0, "--config.train.param_ema=1.0"),
])
def test_bad_config_values_are_named(tmp_path, key, value, message):
  config = smoke_config(**{"dataset.root": str(tmp_path), key: value})
  if key == "eval.every_epochs":  # only an error when the test set selects the epoch
    config.eval.selection = "test_oracle"
  with pytest.raises(ValueError) as err:
    experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert message in str(err.value)


def test_memory_plan_that_cannot_fit_stops_before_extraction(tmp_path, monkeypatch):
  root = _tree(tmp_path / "raw")
  config = smoke_config(**{"dataset.root": str(root), "dataset.classes": "bottle",
                           "dataset.data_dir": str(tmp_path / "tfds"),
                           "train.feature_cache": "off"})
  monkeypatch.setattr(memory, "device_limit", lambda mesh: 1024)  # a device of 1 KiB

  def extract(*args, **kwargs):
    raise AssertionError("extraction started")

  monkeypatch.setattr(feature_cache, "extract_split", extract)
  with pytest.raises(MemoryError, match="bottle: training needs .* the device has 0.00 GiB: use "
                                        "--config.train.cache_dtype=bfloat16"):
    experiment.train_and_evaluate(config, str(tmp_path / "run"))


def test_unknown_class_and_missing_root_are_named(tmp_path):
  root = _tree(tmp_path / "raw")
  config = smoke_config(**{"dataset.root": str(root), "dataset.classes": "bottel",
                           "dataset.data_dir": str(tmp_path / "tfds")})
  with pytest.raises(data.DatasetError, match="no class 'bottel'.*bottle"):
    experiment.train_and_evaluate(config, str(tmp_path / "run"))
  config = smoke_config(**{"dataset.root": str(tmp_path / "nowhere"), "dataset.classes": "bottle",
                           "dataset.data_dir": str(tmp_path / "tfds")})
  with pytest.raises(data.DatasetError, match="nowhere does not exist"):
    experiment.train_and_evaluate(config, str(tmp_path / "run"))
  (root / "bottle" / "test" / "crack" / "002.png").unlink()  # its mask is left without image
  config.dataset.root = str(root)
  with pytest.raises(data.DatasetError, match="masks without image: 002"):
    experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # bad data fails before the workdir is made


def test_unwritable_workdir_fails_before_any_work(tmp_path):
  root = _tree(tmp_path / "raw")
  (tmp_path / "file").write_text("")
  config = smoke_config(**{"dataset.root": str(root), "dataset.classes": "bottle",
                           "dataset.data_dir": str(tmp_path / "tfds")})
  with pytest.raises(PermissionError, match=r"--workdir .*file/run is not writable "
                     r"\(NotADirectoryError: Not a directory\): choose another --workdir"):
    experiment.train_and_evaluate(config, str(tmp_path / "file" / "run"))
  assert not (tmp_path / "tfds").exists()  # nothing prepared
  if os.geteuid() != 0:  # root writes into read-only folders
    (tmp_path / "locked").mkdir(mode=0o555)
    with pytest.raises(PermissionError, match=r"locked is not writable \(PermissionError"):
      experiment.train_and_evaluate(config, str(tmp_path / "locked"))
