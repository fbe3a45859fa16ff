"""Users' folder datasets through the main job (`configs/folder.py:smoke`): the crop warning in the
results notes, a class without masks, a class whose test set holds good images only."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import data_trees

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_folder_classes_end_to_end(tmp_path):
  root = tmp_path / "raw"
  data_trees.nonsquare_tree(root, "part")
  data_trees.nonsquare_tree(root, "nomask", masks=False)
  data_trees.nonsquare_tree(root, "goodonly", defects=False)
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "pbas_jax.main", "--config=configs/folder.py:smoke",
         f"--workdir={workdir}", f"--config.dataset.root={root}",
         f"--config.dataset.data_dir={tmp_path / 'tfds'}", "--config.dataset.resize_mode=crop",
         "--config.dataset.image_size=32", "--config.dataset.resize=32",
         "--config.train.epochs=1", "--config.eval.heatmaps=2"]
  env = dict(os.environ, PBAS_JAX_CACHE=str(tmp_path / "cache"))
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # Warned once, for the one class whose crop removes defect pixels.
  assert proc.stderr.count("cuts defect pixels") == 1, proc.stderr[-4000:]
  assert "Downloading and preparing" not in proc.stdout + proc.stderr

  results = json.loads((workdir / "results.json").read_text())
  rows = {row["class"]: row for row in results["rows"]}
  assert sorted(rows) == ["goodonly", "nomask", "part"]
  crop = [n for n in results["notes"] if "cuts defect pixels" in n]
  assert len(crop) == 1 and crop[0].startswith("folder/part test:")
  assert "from 3 of 4 defective images" in crop[0]
  assert "cropped away from 1 of them (still labelled defective): part/test/defect/top.png" \
      in crop[0]
  class_notes = json.loads((workdir / "folder_part" / "results.json").read_text())["notes"]
  assert crop[0] in class_notes

  pixel = ("p_auroc", "p_ap", "p_pro")
  assert all(rows["part"][k] is not None for k in ("i_auroc", "i_ap", *pixel))
  assert rows["nomask"]["i_auroc"] is not None and rows["nomask"]["i_ap"] is not None
  assert all(rows["nomask"][k] is None for k in pixel)
  assert "nomask: pixel metrics (P-AUROC, P-AP, P-PRO) not measured: no ground-truth masks" \
      in results["notes"]
  assert all(rows["goodonly"][k] is None for k in ("i_auroc", "i_ap", *pixel))
  assert any(n.startswith("goodonly: i_auroc: undefined: the test set has no anomalous image")
             for n in results["notes"])
  for name in rows:
    assert len(list((workdir / f"folder_{name}" / "heatmaps").glob("*.png"))) == 2
