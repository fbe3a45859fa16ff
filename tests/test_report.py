"""Results files (json, csv, md), the text table, and mean rows kept apart per alpha."""
import csv
import json

import pytest

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
  (mean,) = loaded["means"]
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
  assert loaded["means"][0]["epoch"] is None and "varies" in printed
  with open(tmp_path / "results.csv", newline="") as f:
    assert {r["test_set_used_for_selection"] for r in csv.DictReader(f)} == {"True"}


def test_format_table_percent_and_extra_columns():
  text = report.format_table([_row("bracket_black", alpha=0.3), _row("tubes", alpha=0.5)])
  lines = text.splitlines()
  assert lines[0].split() == ["dataset", "class", "alpha", "I-AUROC", "I-AP", "P-AUROC", "P-AP",
                              "P-PRO", "epoch", "time", "(s)", "img/s"]
  assert lines[2].split()[:5] == ["mpdd", "bracket_black", "0.3", "98.8", "99.0"]
  # One mean row per alpha, below a second rule.
  assert set(lines[4]) == {"-", " "}
  assert [line.split()[:4] for line in lines[5:7]] == [["mpdd", "mean", "0.3", "98.8"],
                                                      ["mpdd", "mean", "0.5", "98.8"]]


def test_mean_rows_never_average_different_alphas(tmp_path):
  rows = [_row(cls, seed=seed, alpha=alpha, i_auroc=value,
               p_auroc=None if cls == "tubes" and alpha == 0.3 else 0.9)
          for alpha, base in ((0.1, 0.6), (0.3, 0.8))
          for seed in (0, 1)
          for cls, value in (("metal_plate", base), ("tubes", base + 0.1 * seed))]
  results = report.write_results(tmp_path, rows, "last", echo=False)
  means = results["means"]
  assert [(m["class"], m["alpha"]) for m in means] == [("mean", 0.1), ("mean", 0.3)]
  assert means[0]["i_auroc"] == pytest.approx((0.6 + 0.6 + 0.6 + 0.7) / 4)
  assert means[1]["i_auroc"] == pytest.approx((0.8 + 0.8 + 0.8 + 0.9) / 4)
  assert means[0]["seed"] is None  # rows of both seeds
  assert results["notes"] == ["alpha 0.3: mean p_auroc is over 2 of 4 rows (others not measured)"]
  with open(tmp_path / "results.csv", newline="") as f:
    table = [r for r in csv.DictReader(f) if r["class"] == "mean"]
  assert [(r["alpha"], round(float(r["i_auroc"]), 4)) for r in table] == [("0.1", 0.625),
                                                                          ("0.3", 0.825)]
  md = (tmp_path / "results.md").read_text()
  assert "| **mpdd** | **mean** | **0.1** | **62.5** |" in md
  assert "| **mpdd** | **mean** | **0.3** | **82.5** |" in md
  # Rows without alpha keep the single mean row.
  (mean,) = report.write_results(tmp_path, [_row("a"), _row("b")], "last", echo=False)["means"]
  assert "alpha" not in mean


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
