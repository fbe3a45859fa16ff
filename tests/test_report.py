"""Results files (json, csv, md), the text table and heatmap panels."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from pbas_jax import report


def _row(cls, **kw):
  row = {"dataset": "mpdd", "class": cls, "seed": 0, "i_auroc": 0.98765, "i_ap": 0.99,
         "p_auroc": 0.97, "p_ap": 0.5, "p_pro": 0.9, "pro_variant": "standard", "epoch": 640,
         "selection": "last", "wall_time_s": 120.0, "images_per_s": 50.0}
  row.update(kw)
  return row


def test_write_results_files_parse_and_agree(tmp_path):
  rows = [_row("metal_plate"), _row("tubes", i_auroc=0.9, p_auroc=None, p_ap=None, p_pro=None,
                                    wall_time_s=80.0, images_per_s=30.0)]
  notes = ["backbone weights are random: numbers are not meaningful"]
  results = report.write_results(tmp_path, rows, "last", notes, echo=False)
  loaded = json.loads((tmp_path / "results.json").read_text())
  assert loaded == results
  assert loaded["selection"] == "last" and loaded["notes"][0] == notes[0]
  mean = loaded["mean"]
  assert mean["i_auroc"] == pytest.approx((0.98765 + 0.9) / 2)
  assert mean["p_auroc"] == pytest.approx(0.97)           # over the one row that measured it
  assert any("mean p_auroc is over 1 of 2 rows" in n for n in loaded["notes"])
  assert mean["wall_time_s"] == 200.0 and mean["images_per_s"] == 40.0 and mean["epoch"] == 640

  with open(tmp_path / "results.csv", newline="") as f:
    table = list(csv.DictReader(f))
  assert [r["class"] for r in table] == ["metal_plate", "tubes", "mean"]
  assert float(table[0]["i_auroc"]) == 0.98765 and table[1]["p_pro"] == ""
  assert {r["test_set_used_for_selection"] for r in table} == {"False"}

  md = (tmp_path / "results.md").read_text()
  assert "| mpdd | metal_plate | 98.8 | 99.0 | 97.0 | 50.0 | 90.0 | 640 |" in md
  assert notes[0] in md and "TEST SET" not in md
  assert not list(tmp_path.glob("*.tmp"))


def test_test_oracle_is_stated_everywhere(tmp_path, capsys):
  rows = [_row("metal_plate", selection="test_oracle", epoch=17),
          _row("tubes", selection="test_oracle", epoch=333)]
  report.write_results(tmp_path, rows, "test_oracle", [])
  printed = capsys.readouterr().out
  assert report.TEST_ORACLE_NOTE in printed
  assert report.TEST_ORACLE_NOTE in (tmp_path / "results.md").read_text()
  loaded = json.loads((tmp_path / "results.json").read_text())
  assert loaded["notes"][0] == report.TEST_ORACLE_NOTE
  assert loaded["mean"]["epoch"] is None and "varies" in printed
  with open(tmp_path / "results.csv", newline="") as f:
    assert {r["test_set_used_for_selection"] for r in csv.DictReader(f)} == {"True"}


def test_format_table_percent_and_extra_columns():
  text = report.format_table([_row("bracket_black", alpha=0.3), _row("tubes", alpha=0.5)])
  lines = text.splitlines()
  assert lines[0].split() == ["dataset", "class", "alpha", "I-AUROC", "I-AP", "P-AUROC", "P-AP",
                              "P-PRO", "epoch", "time", "(s)", "img/s"]
  assert lines[2].split()[:5] == ["mpdd", "bracket_black", "0.3", "98.8", "99.0"]
  assert lines[5].split()[:4] == ["mpdd", "mean", "-", "98.8"]


def test_single_class_file_and_bad_inputs(tmp_path):
  report.write_results(tmp_path, [_row("tubes")], "last", files=("json",), echo=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
  with pytest.raises(ValueError, match="eval.selection"):
    report.write_results(tmp_path, [_row("tubes")], "best", echo=False)
  with pytest.raises(ValueError, match="one protocol"):
    report.write_results(tmp_path, [_row("tubes", selection="test_oracle")], "last", echo=False)
  with pytest.raises(ValueError, match="lacks keys"):
    report.format_table([{"dataset": "mpdd", "class": "tubes"}])


def test_mixed_pro_variants_leave_mean_pro_out():
  mean, notes = report.mean_row([_row("a"), _row("b", pro_variant="reference")])
  assert mean["p_pro"] is None and mean["pro_variant"] is None
  assert any("mix PRO variants" in n for n in notes)


def test_jet_ends_and_middle():
  np.testing.assert_array_equal(report.jet(np.array([0.0, 0.5, 1.0])),
                                [[0, 0, 128], [128, 255, 128], [128, 0, 0]])


def test_save_heatmaps_sizes_cap_and_content(tmp_path):
  n, s = 3, 32
  rng = np.random.default_rng(0)
  rgb = rng.random((n, s, s, 3)).astype(np.float32)
  images = (rgb - report.IMAGENET_MEAN) / report.IMAGENET_STD
  masks = np.zeros((n, s, s), np.float32)
  masks[:, 8:16, 8:16] = 1
  maps = rng.random((n, s, s)).astype(np.float32)
  names = ["good/000", "scratch/001", "scratch/002"]
  paths = report.save_heatmaps(tmp_path, images, masks, maps, names, maps.max(axis=(1, 2)),
                               limit=2)
  assert [p.rsplit("/", 1)[-1] for p in paths] == ["0000_good_000.png", "0001_scratch_001.png"]
  panel = np.asarray(Image.open(paths[1]))
  gap, caption = 4, 14
  assert panel.shape == (s + caption, 4 * s + 3 * gap, 3)
  # First tile: the un-normalized image; second: the mask in white.
  np.testing.assert_allclose(panel[caption:, :s], rgb[1] * 255, atol=1.0)
  assert (panel[caption + 8:caption + 16, s + gap + 8:s + gap + 16] == 255).all()
  assert (panel[caption:caption + 8, s + gap:2 * s + gap] == 0).all()

  assert len(report.save_heatmaps(tmp_path / "all", images, None, maps, names, np.zeros(n),
                                  limit=-1)) == 3
  assert report.save_heatmaps(tmp_path / "none", images, None, maps, names, np.zeros(n),
                              limit=0) == []
  with pytest.raises(ValueError, match="same N images"):
    report.save_heatmaps(tmp_path, images, None, maps, names[:2], np.zeros(n))
