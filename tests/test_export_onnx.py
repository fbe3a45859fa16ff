"""Deployment: decision thresholds, ONNX export equal to the package, ONNX predict without JAX,
and predict skipping unreadable images (both paths)."""
import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import data_trees
from conftest import require
from pbas_jax import config_base
from pbas_jax import deploy
from pbas_jax import experiment
from pbas_jax import metrics
from pbas_jax import report
from pbas_jax import trained

REPO = pathlib.Path(__file__).resolve().parents[1]
# What the ONNX predict path must run without (it needs onnxruntime, numpy, pillow; absl for the
# command line).
BLOCKED = ("jax", "jaxlib", "flax", "optax", "orbax", "jax2onnx", "tensorflow",
           "tensorflow_datasets", "ml_collections", "scipy", "torch")


# ---------------------------------------------------------------------------------------------
# Thresholds (numbers checked by hand or by brute force).


def test_threshold_quantiles_of_normal_scores_and_map_peaks():
  scores = np.array([0.1, 0.4, 0.2, 0.3], np.float32)
  maps = np.zeros((4, 3, 3), np.float32)
  maps[:, 1, 1] = [0.05, 0.2, 0.1, 0.15]  # peaks
  got = metrics.normal_thresholds(scores, maps, 1.0)
  assert got == {"threshold": pytest.approx(0.4), "pixel_threshold": pytest.approx(0.2)}
  # Linear interpolation between order statistics: 0.5 -> halfway between 0.2 and 0.3.
  assert metrics.normal_thresholds(scores, maps, 0.5)["threshold"] == pytest.approx(0.25)
  with pytest.raises(ValueError, match="threshold_quantile"):
    metrics.normal_thresholds(scores, maps, 0.0)


def test_threshold_decision_rates_and_f1():
  scores = np.array([0.1, 0.5, 0.3, 0.9, 0.7, 0.2])
  labels = np.array([0, 0, 0, 1, 1, 1])
  # score > 0.4: normal 0.5 called anomalous (1 of 3), anomalous 0.2 missed (1 of 3).
  got = metrics.decision_metrics(scores, labels, 0.4)
  assert got["fpr"] == pytest.approx(1 / 3) and got["fnr"] == pytest.approx(1 / 3)
  assert got["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  assert metrics.decision_metrics(scores, np.zeros(6), 0.4) == {"fpr": 0.5, "fnr": None,
                                                                "f1": None}


def test_threshold_f1_optimal_is_the_best_of_every_cut():
  rng = np.random.default_rng(0)
  scores = np.round(rng.random(40), 2)  # ties on purpose
  labels = rng.random(40) < 0.4
  threshold, f1 = metrics.f1_optimal_threshold(scores, labels)
  cuts = np.concatenate([[-1.0], np.unique(scores)])  # every distinct decision: score > cut
  brute = max(metrics.decision_metrics(scores, labels, c)["f1"] for c in cuts)
  assert f1 == pytest.approx(brute)
  assert metrics.decision_metrics(scores, labels, threshold)["f1"] == pytest.approx(f1)
  assert not np.isin(threshold, scores)  # a midpoint: no score sits on it
  assert metrics.f1_optimal_threshold(scores, np.zeros(40)) == (None, None)


def test_threshold_decision_table_in_reports(tmp_path):
  row = {"dataset": "mvtec", "class": "bottle", "seed": 0, "i_auroc": 0.9, "i_ap": 0.9,
         "p_auroc": 0.9, "p_ap": 0.5, "p_pro": 0.8, "pro_variant": "standard", "epoch": 3,
         "wall_time_s": 1.0, "images_per_s": 2.0, "run": 0, "alpha": 0.25,
         "threshold_quantile": 0.99, "threshold": 0.61234, "pixel_threshold": 0.5,
         "threshold_fpr": 0.25, "threshold_fnr": 0.125, "threshold_f1": 0.8,
         "test_selected_threshold": 0.7, "test_selected_f1": 0.9}
  results = report.write_results(tmp_path, [row], "last", echo=False)
  assert all(k not in results["means"][0] for k in report.DECISION_KEYS)  # no mean threshold
  text = report.format_table([row])
  header, metrics_row = text.splitlines()[0], text.splitlines()[2]
  assert "threshold" not in header and "0.6123" not in metrics_row  # not in the metrics table
  assert "test-selected F1" in text and "0.6123" in text and "12.5" in text
  md = (tmp_path / "results.md").read_text()
  assert "## Decision" in md and "| 25.0 | 12.5 | 80.0 |" in md
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert float(rows[0]["threshold"]) == pytest.approx(0.61234) and rows[1]["threshold"] == ""


def test_threshold_missing_writes_scores_without_decisions(tmp_path):
  """A model reported before thresholds existed: scores, no decision, no mask; several runs get
  a column set each; a skipped file keeps its reason."""
  maps = np.zeros((2, 4, 4), np.float32)
  maps[1, 0, :3] = 0.9
  runs = {"seed0_k0.25": deploy.Scored(np.array([0.1, 0.9]), maps, None, None),
          "seed1_k0.25": deploy.Scored(np.array([0.2, 0.8]), maps, 0.5, 0.5)}
  images = np.zeros((2, 4, 4, 3), np.float32)
  deploy.write_predictions(str(tmp_path), ["a.png", "a.jpg"], images, runs,
                           [("c.png", "cannot read")], heatmaps=0)
  rows = _read_csv(tmp_path / "scores.csv")
  assert list(rows[0]) == ["file", "score_seed0_k0.25", "anomalous_seed0_k0.25",
                           "defect_pixels_seed0_k0.25", "score_seed1_k0.25",
                           "anomalous_seed1_k0.25", "defect_pixels_seed1_k0.25", "skipped"]
  assert [r["anomalous_seed0_k0.25"] for r in rows] == ["", "", ""]
  assert [r["anomalous_seed1_k0.25"] for r in rows] == ["0", "1", ""]
  assert [r["defect_pixels_seed1_k0.25"] for r in rows] == ["0", "3", ""]
  assert rows[2] == {**{k: "" for k in rows[2]}, "file": "c.png", "skipped": "cannot read"}
  assert not (tmp_path / "masks" / "seed0_k0.25").exists()
  # Stems that collide keep their extension in the mask's name.
  assert sorted(os.listdir(tmp_path / "masks" / "seed1_k0.25")) == ["a.jpg_mask.png",
                                                                   "a.png_mask.png"]


# ---------------------------------------------------------------------------------------------
# A trained smoke class per backbone (in process: 1 epoch, 32 px, random weights).


def _make_tree(root: pathlib.Path) -> pathlib.Path:
  return data_trees.noisy_mvtec_tree(root, n_train=8, test=(("good", 3), ("crack", 3)), size=(40, 48))


BACKBONES = {
    "resnet18": {},
    "efficientnet_lite0": {"backbone.layers": ("blocks2", "blocks4")},
}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def smoke_class(request, tmp_path_factory):
  """(workdir, raw root, backbone) of a trained class `bottle`, with its ONNX export."""
  tmp = tmp_path_factory.mktemp(request.param)
  root = _make_tree(tmp / "raw")
  config = config_base.load(str(REPO / "configs" / "mvtec.py:smoke"))
  config_base.apply_overrides(config, {
      "backbone.name": request.param, **BACKBONES[request.param],
      "backbone.pretrain_dim": 64, "backbone.target_dim": 64, "model.disc_hidden": 32,
      "dataset.root": str(root), "dataset.data_dir": str(tmp / "tfds"),
      "dataset.classes": "bottle", "dataset.image_size": 32, "dataset.resize": 36,
      "train.epochs": 1, "eval.heatmaps": 0, "eval.batch_size": 4})
  workdir = tmp / "run"
  experiment.train_and_evaluate(config, str(workdir))
  require(importlib.util.find_spec("jax2onnx") is not None,
          "jax2onnx missing: install the onnx extra")
  from pbas_jax import export  # pylint: disable=g-import-not-at-top  (needs jax2onnx)
  paths = export.export_class(str(workdir), "bottle")
  return workdir, root, paths


def _images_with_a_broken_file(root: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
  """Test images of both kinds, plus one truncated PNG, in one folder."""
  folder.mkdir(exist_ok=True)
  for kind in ("good", "crack"):
    for path in sorted((root / "bottle" / "test" / kind).glob("*.png")):
      (folder / f"{kind}_{path.name}").write_bytes(path.read_bytes())
  good = (folder / "good_000.png").read_bytes()
  (folder / "broken.png").write_bytes(good[:len(good) // 2])
  return folder


def _read_csv(path) -> list[dict]:
  with open(path) as f:
    return list(csv.DictReader(f))


def test_threshold_from_training_images_stored_with_the_results(smoke_class, tmp_path):
  workdir, root, _ = smoke_class
  row = json.loads((workdir / "mvtec_bottle" / "results.json").read_text())["rows"][0]
  # Recomputed here from the training images (read and scored again, by the JAX predict path).
  _, train, _ = trained.predict_folder(str(workdir), "bottle",
                                       str(root / "bottle" / "train" / "good"), str(tmp_path / "t"),
                                       heatmaps=0)
  train = train["seed0_k0.25"]
  want = metrics.normal_thresholds(train.scores, train.maps, 0.99)
  # The same images and model; features extracted in other batch shapes round differently.
  assert row["threshold"] == pytest.approx(want["threshold"], rel=1e-4)
  assert row["pixel_threshold"] == pytest.approx(want["pixel_threshold"], rel=1e-4)
  assert row["threshold_quantile"] == 0.99
  _, test, _ = trained.predict_folder(str(workdir), "bottle",
                                      str(_images_with_a_broken_file(root, tmp_path / "i")),
                                      str(tmp_path / "p"), heatmaps=0)
  scores = test["seed0_k0.25"].scores
  names = [r["file"] for r in _read_csv(tmp_path / "p" / "scores.csv") if not r["skipped"]]
  labels = np.array([name.startswith("crack") for name in names])
  at = metrics.decision_metrics(scores, labels, row["threshold"])
  assert row["threshold_fpr"] == pytest.approx(at["fpr"])
  assert row["threshold_fnr"] == pytest.approx(at["fnr"])
  assert row["threshold_f1"] == pytest.approx(at["f1"])


def test_export_onnx_equals_jax_predict_and_writes_decisions(smoke_class, tmp_path):
  """The ONNX file scores a folder as the package does (scores and maps, 1e-4 relative: float32
  rounding of the same operations in another order), and both paths write the same CSV."""
  workdir, root, paths = smoke_class
  assert [os.path.basename(p) for p in paths] == ["mvtec_bottle.onnx"]
  meta = json.loads(pathlib.Path(deploy.json_path(paths[0])).read_text())
  row = json.loads((workdir / "mvtec_bottle" / "results.json").read_text())["rows"][0]
  assert meta["input"]["image_size"] == 32 and meta["input"]["resize_mode"] == "crop"
  assert meta["input"]["resize"] == 36 and len(meta["backbone"]["weights_sha256"]) == 64
  assert meta["decision"]["threshold"] == row["threshold"]
  images = _images_with_a_broken_file(root, tmp_path / "images")

  jax_names, jax_runs, jax_skipped = trained.predict_folder(
      str(workdir), "bottle", str(images), str(tmp_path / "jax"), heatmaps=2)
  onnx_names, onnx_runs, onnx_skipped = deploy.predict_folder(
      paths[0], str(images), str(tmp_path / "onnx"), heatmaps=2)
  assert jax_names == onnx_names and len(jax_names) == 6
  assert [n for n, _ in jax_skipped] == [n for n, _ in onnx_skipped] == ["broken.png"]
  want, got = jax_runs["seed0_k0.25"], onnx_runs["seed0_k0.25"]
  np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4)
  np.testing.assert_allclose(got.maps, want.maps, rtol=1e-4, atol=1e-4 * np.abs(want.maps).max())

  jax_csv, onnx_csv = (_read_csv(tmp_path / p / "scores.csv") for p in ("jax", "onnx"))
  assert list(jax_csv[0]) == list(onnx_csv[0]) == ["file", "score", "anomalous",
                                                   "defect_pixels", "skipped"]
  assert [r["file"] for r in onnx_csv] == [*onnx_names, "broken.png"]
  assert "cannot read image file" in onnx_csv[-1]["skipped"] and onnx_csv[-1]["score"] == ""
  for r, score, amap in zip(onnx_csv, got.scores, got.maps):
    assert r["anomalous"] == str(int(score > row["threshold"]))
    mask = np.asarray(Image.open(tmp_path / "onnx" / "masks" / f"{r['file'][:-4]}_mask.png"))
    assert mask.shape == (32, 32) and int(r["defect_pixels"]) == int((mask == 255).sum())
    np.testing.assert_array_equal(mask == 255, amap > row["pixel_threshold"])
  assert len(list((tmp_path / "onnx" / "heatmaps").glob("*.png"))) == 2


def _run_predict_without_jax(*args) -> subprocess.CompletedProcess:
  blocker = (
      "import sys, runpy\n"
      f"BLOCKED = {BLOCKED!r}\n"
      "class Blocker:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] in BLOCKED:\n"
      "      raise ImportError(f'{name} is blocked: the ONNX predict path must not import it')\n"
      "sys.meta_path.insert(0, Blocker())\n"
      f"sys.argv = ['predict', *{list(args)!r}]\n"
      "runpy.run_module('pbas_jax.predict', run_name='__main__', alter_sys=True)\n")
  return subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


def test_onnx_predict_runs_without_jax_and_skips_unreadable_images(smoke_class, tmp_path):
  _, root, paths = smoke_class
  images = _images_with_a_broken_file(root, tmp_path / "images")
  proc = _run_predict_without_jax(f"--detector={paths[0]}", f"--images={images}",
                                  f"--output={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped broken.png" in proc.stdout and "skipped 1" in proc.stdout
  assert "broken.png" in proc.stderr  # the log names it too
  rows = _read_csv(tmp_path / "out" / "scores.csv")
  assert len(rows) == 7 and rows[-1]["file"] == "broken.png"
  # Only unreadable files: nothing scored, the command fails and says why.
  only_broken = tmp_path / "broken"
  only_broken.mkdir()
  (only_broken / "a.png").write_bytes(b"not a png")
  proc = _run_predict_without_jax(f"--detector={paths[0]}", f"--images={only_broken}")
  assert proc.returncode != 0 and "nothing scored" in proc.stderr and "a.png" in proc.stderr


def test_jax_predict_with_only_unreadable_images_fails(smoke_class, tmp_path):
  workdir, _, _ = smoke_class
  folder = tmp_path / "broken"
  folder.mkdir()
  (folder / "a.png").write_bytes(b"not a png")
  with pytest.raises(deploy.NothingScoredError, match="a.png"):
    trained.predict_folder(str(workdir), "bottle", str(folder), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_export_resnet50_bottlenecks_equal_jax():
  """A Bottleneck ResNet (as WideResNet50) exports to a graph onnxruntime accepts and that
  computes what JAX computes (jax2onnx 0.17 miscompiles it with its transpose-pair pass, which
  export turns off). Random backbone and heads: no training needed to compare the graphs."""
  require(importlib.util.find_spec("jax2onnx") is not None,
          "jax2onnx missing: install the onnx extra")
  import jax  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  from pbas_jax import backbones, export, train  # pylint: disable=g-import-not-at-top
  config = config_base.load(str(REPO / "configs" / "mvtec.py:smoke"))
  config_base.apply_overrides(config, {"backbone.name": "resnet50", "backbone.pretrain_dim": 64,
                                       "backbone.target_dim": 64, "model.disc_hidden": 32,
                                       "dataset.image_size": 32})
  state = train.create_train_state(config, jax.random.key(0), 64)
  detect = export.detector_fn(config, state, backbones.init_variables("resnet50", 0))
  session = onnxruntime.InferenceSession(export.to_onnx(detect, 32, "resnet50"),
                                         providers=["CPUExecutionProvider"])
  images = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
  scores, maps = session.run(list(deploy.OUTPUTS), {deploy.INPUT: images})
  want_scores, want_maps = jax.jit(detect)(images)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-4)
  np.testing.assert_allclose(maps, want_maps, rtol=1e-4, atol=1e-4 * np.abs(want_maps).max())
