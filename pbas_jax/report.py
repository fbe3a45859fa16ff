"""Results tables of a workdir: per-class rows and mean rows, as text, csv, json and markdown.

A results row is the dict of the run-outputs contract: {"dataset", "class", "seed", "i_auroc",
"i_ap", "p_auroc", "p_ap", "p_pro", "pro_variant", "epoch", "selection", "wall_time_s",
"images_per_s"} plus optional extra keys (e.g. "alpha", "run"; "diverged_epoch" for a run whose
training diverged, its metrics None). Metrics are fractions in [0, 1] or None where not
measurable; tables print them in percent with one decimal. Rows of different anomaly degrees
(`alpha`) are different methods: each alpha gets its own mean row. Every file is written to a
temporary name and renamed (`fileio.atomic_write`), so a reader never sees half a file. Heatmap
panels are `heatmaps.py`'s.
"""
import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pbas_jax import fileio

METRIC_KEYS = ("i_auroc", "i_ap", "p_auroc", "p_ap", "p_pro")
METRIC_TITLES = ("I-AUROC", "I-AP", "P-AUROC", "P-AP", "P-PRO")
ROW_KEYS = ("dataset", "class", "seed", *METRIC_KEYS, "pro_variant", "epoch", "selection",
            "wall_time_s", "images_per_s")
# A run's decision (experiment.decision): thresholds from its training images, what they give on
# the test set (rates and F1 as fractions), and the test-selected F1-optimal threshold. Shown in a
# table of their own; mean rows leave them out (thresholds of different classes do not average).
DECISION_KEYS = ("threshold_quantile", "threshold", "pixel_threshold", "threshold_fpr",
                 "threshold_fnr", "threshold_f1", "test_selected_threshold", "test_selected_f1")
_DECISION_TITLES = ("quantile", "threshold", "pixel thr.", "FPR", "FNR", "F1",
                    "test-selected thr.", "test-selected F1")
_DECISION_PERCENT = ("threshold_fpr", "threshold_fnr", "threshold_f1", "test_selected_f1")
SELECTIONS = ("last", "test_oracle")
TEST_ORACLE_NOTE = ("MODEL SELECTED ON THE TEST SET (selection='test_oracle'): each class reports "
                    "the epoch with the highest test I-AUROC + P-AUROC, as the reference code "
                    "does; these numbers are optimistic, not held-out results")


def _common(rows: Sequence[dict[str, Any]], key: str) -> Any:
  values = {r.get(key) for r in rows}
  return values.pop() if len(values) == 1 else None


def mean_row(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
  """The mean row over classes and the notes it needs.

  Each metric is averaged over the rows that measured it (a note says when some did not); P-PRO
  is left out when rows mix PRO variants. `epoch`, `seed`, `pro_variant` and `selection` are kept
  when all rows agree and None otherwise; `wall_time_s` is the total and `images_per_s` the mean.
  """
  notes = []
  mean: dict[str, Any] = {"dataset": _common(rows, "dataset") or "all", "class": "mean"}
  for key in ("seed", "pro_variant", "epoch", "selection"):
    mean[key] = _common(rows, key)
  for key in METRIC_KEYS:
    measured = [r[key] for r in rows if r.get(key) is not None]
    if key == "p_pro" and measured and mean["pro_variant"] is None:
      measured = []
      notes.append("mean p_pro not computed: rows mix PRO variants")
    elif measured and len(measured) < len(rows):
      notes.append(f"mean {key} is over {len(measured)} of {len(rows)} rows (others not measured)")
    mean[key] = float(np.mean(measured)) if measured else None
  times = [r["wall_time_s"] for r in rows if r.get("wall_time_s") is not None]
  rates = [r["images_per_s"] for r in rows if r.get("images_per_s") is not None]
  mean["wall_time_s"] = float(np.sum(times)) if times else None
  mean["images_per_s"] = float(np.mean(rates)) if rates else None
  return mean, notes


def mean_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
  """`mean_row` of each alpha's rows (in first-seen order) and their notes.

  Rows without an `alpha` key form one group; a group's mean row carries its `alpha`, and its
  notes start with it. Different alphas are never averaged together.
  """
  if not rows:
    raise ValueError("no result rows to report")
  groups: dict[Any, list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(r.get("alpha"), []).append(r)
  means, notes = [], []
  for alpha, group in groups.items():
    mean, group_notes = mean_row(group)
    if alpha is not None:
      mean["alpha"] = alpha
    means.append(mean)
    notes += [n if alpha is None else f"alpha {alpha:g}: {n}" for n in group_notes]
  return means, notes


def _check_rows(rows: Sequence[dict[str, Any]], selection: str) -> list[dict[str, Any]]:
  if selection not in SELECTIONS:
    raise ValueError(f"eval.selection={selection!r}: use one of {SELECTIONS}")
  checked = []
  for r in rows:
    missing = [k for k in ("dataset", "class", *METRIC_KEYS) if k not in r]
    if missing:
      raise ValueError(f"result row {r.get('dataset')}/{r.get('class')} lacks keys {missing}")
    if r.get("selection", selection) != selection:
      raise ValueError(f"row {r['dataset']}/{r['class']} was selected by {r['selection']!r}, "
                       f"the report by {selection!r}: report one protocol at a time")
    checked.append({**r, "selection": selection})
  return checked


def _all_notes(selection: str, notes: Iterable[str]) -> list[str]:
  lead = [TEST_ORACLE_NOTE] if selection == "test_oracle" else []
  return list(dict.fromkeys([*lead, *notes]))  # ordered, without repeats


def _extra_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
  return sorted({k for r in rows for k in r} - set(ROW_KEYS) - set(DECISION_KEYS))


def _cell(key: str, value: Any) -> str:
  if value is None:
    return "-"
  if key in METRIC_KEYS or key in _DECISION_PERCENT:
    return f"{100 * value:.1f}"
  if key in ("threshold", "pixel_threshold", "test_selected_threshold"):
    return f"{value:.4g}"
  if isinstance(value, float):
    return f"{value:.1f}" if key in ("wall_time_s", "images_per_s") else f"{value:g}"
  return str(value)


def _table(rows: Sequence[dict[str, Any]], means: Sequence[dict[str, Any]]) -> list[list[str]]:
  """Header and cells: one line per row, then the mean rows."""
  extras = _extra_keys(rows)
  keys = ["dataset", "class", *extras, *METRIC_KEYS, "epoch", "wall_time_s", "images_per_s"]
  header = ["dataset", "class", *extras, *METRIC_TITLES, "epoch", "time (s)", "img/s"]
  lines = [[_cell(k, r.get(k)) for k in keys] for r in rows]
  for mean in means:
    lines.append([_cell(k, mean.get(k)) for k in keys])
    if mean.get("epoch") is None:
      lines[-1][keys.index("epoch")] = "varies"
  return [header, *lines]


def _decision_table(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
  """Header and cells of the decision table (`DECISION_KEYS`); empty when no row has one."""
  if not any("threshold" in r for r in rows):
    return []
  names = ["dataset", "class", *[k for k in ("seed", "alpha") if k in _extra_keys(rows)]]
  return [[*names, *_DECISION_TITLES],
          *[[_cell(k, r.get(k)) for k in (*names, *DECISION_KEYS)] for r in rows]]


_DECISION_NOTE = ("decision: an image is anomalous where its score > threshold, chosen from the "
                  "training images alone (the quantile of their scores); FPR, FNR and F1 are "
                  "what it gives on the test set; the test-selected threshold maximizes test F1 "
                  "and is optimistic")


def _variant(means: Sequence[dict[str, Any]]) -> str:
  return _common(means, "pro_variant") or "mixed"


def format_table(rows: Sequence[dict[str, Any]], selection: str = "last",
                 notes: Iterable[str] = ()) -> str:
  """Plain-text table of the rows and each alpha's mean row (percent, one decimal), then notes."""
  rows = _check_rows(rows, selection)
  means, mean_notes = mean_rows(rows)
  table = _table(rows, means)
  widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
  # Names left-aligned, numbers right-aligned.
  text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(line, widths))) for line in table]
  rule = "  ".join("-" * w for w in widths)
  text = [text[0], rule, *text[1:-len(means)], rule, *text[-len(means):]]
  text.append(f"selection: {selection}; P-PRO variant: {_variant(means)}")
  decision = _decision_table(rows)
  if decision:
    widths = [max(len(line[i]) for line in decision) for i in range(len(decision[0]))]
    text += ["", *["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(line, widths))) for line in decision],
             _DECISION_NOTE]
  text += [f"note: {n}" for n in _all_notes(selection, [*notes, *mean_notes])]
  return "\n".join(text)


def _markdown(rows, means, selection, notes) -> str:
  table = _table(rows, means)
  out = ["# Results", ""]
  if selection == "test_oracle":
    out += [f"**{TEST_ORACLE_NOTE}.**", ""]
  out += ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
  out += ["| " + " | ".join(line) + " |" for line in table[1:-len(means)]]
  out += ["| " + " | ".join(f"**{c}**" for c in line) + " |" for line in table[-len(means):]]
  out += ["", f"Metrics in percent. Selection: `{selection}`; P-PRO variant: "
          f"`{_variant(means)}`; time (s) of a mean row is the total.", ""]
  decision = _decision_table(rows)
  if decision:
    out += ["## Decision", "", "| " + " | ".join(decision[0]) + " |", "|" + "---|" * len(decision[0])]
    out += ["| " + " | ".join(line) + " |" for line in decision[1:]]
    out += ["", f"{_DECISION_NOTE[0].upper()}{_DECISION_NOTE[1:]}; rates in percent.", ""]
  if notes:
    out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(out)


def _csv(rows, means, selection) -> str:
  decision = [k for k in DECISION_KEYS if any(k in r for r in rows)]
  columns = [*ROW_KEYS, *_extra_keys(rows), *decision, "test_set_used_for_selection"]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
  writer.writeheader()
  for r in [*rows, *means]:
    writer.writerow({**{k: "" if r.get(k) is None else r.get(k) for k in columns},
                     "test_set_used_for_selection": selection == "test_oracle"})
  return buf.getvalue()


def write_results(directory: str | os.PathLike, rows: Sequence[dict[str, Any]], selection: str,
                  notes: Iterable[str] = (), files: Sequence[str] = ("json", "csv", "md"),
                  echo: bool = True) -> dict[str, Any]:
  """Writes `results.{json,csv,md}` (those in `files`) to `directory` and prints the table.

  Args:
    directory: output folder (created).
    rows: result rows (see the module docstring), one per class (or run).
    selection: 'last' or 'test_oracle'; with 'test_oracle' every output says the test set was used
      for model selection.
    notes: free-text caveats, e.g. "backbone weights are random: numbers are not meaningful".
    files: which of the three files to write (a class folder holds only results.json).
    echo: print the text table and notes.

  Returns:
    The results.json content: {"rows", "means" (one mean row per alpha, see `mean_rows`),
    "selection", "notes"}.
  """
  unknown = set(files) - {"json", "csv", "md"}
  if unknown:
    raise ValueError(f"unknown result files {sorted(unknown)}: use json, csv, md")
  rows = _check_rows(rows, selection)
  means, mean_notes = mean_rows(rows)
  all_notes = _all_notes(selection, [*notes, *mean_notes])
  results = {"rows": rows, "means": means, "selection": selection, "notes": all_notes}
  writers = {"json": lambda: json.dumps(results, indent=2) + "\n",
             "csv": lambda: _csv(rows, means, selection),
             "md": lambda: _markdown(rows, means, selection, all_notes)}
  for kind in files:
    fileio.atomic_write(os.path.join(directory, f"results.{kind}"), writers[kind]())
  if echo:
    print(format_table(rows, selection, notes), flush=True)
  return results
