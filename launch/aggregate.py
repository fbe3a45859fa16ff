r"""Paper-style tables of a sweep: per-class rows and a mean row, mean +- std over seeds.

    python -m launch.aggregate --sweep_dir=runs/mvtec_seeds

reads every finished task's `results.json` (the tasks are listed in `<sweep_dir>/sweep.json`),
groups the rows by dataset, the sweep's overrides except class and seed (and `train.num_runs`,
`train.k_values`: the runs a task trains together, each reported as its own row with its `seed`
and `alpha`), the rows' anomaly degree `alpha` and the model-selection protocol, and writes
`<sweep_dir>/results.md` and `<sweep_dir>/results.csv`. A class row is the mean +- sample std
(n-1) over its seeds; the mean row first averages the classes within each seed (as a single run's
mean row does), then gives mean +- std of those per-seed means; different alphas are never
averaged together. Metrics are in percent with one decimal; '-' where not measured. Unfinished or
failed tasks are listed with their logs.
"""
import csv
import dataclasses
import io
import json
import os
import pathlib
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from launch import spec
from pbas_jax import fileio
from pbas_jax import report

# Not settings: which class, and which runs (seeds, alphas) a task trains; every row names its own.
_EXCLUDED = (spec.CLASS_KEY, spec.SEED_KEY, *spec.RUN_KEYS)


@dataclasses.dataclass(frozen=True)
class Stats:
  """One table row: `name` (a class, or 'mean'), the seeds it covers, metric -> (mean, std).

  mean/std are fractions; std is None for a single seed, both None where nothing was measured.
  """
  name: str
  seeds: tuple
  metrics: dict


@dataclasses.dataclass(frozen=True)
class Group:
  """The rows of one setting: same dataset, overrides (except class/seed), alpha and protocol."""
  dataset: str
  setting: tuple  # ((key, value), ...) in the sweep's order
  alpha: Optional[float]  # the rows' `alpha`; None for rows without one
  selection: str
  pro_variant: str
  classes: list   # [Stats, ...] in first-seen order
  mean: Optional[Stats]
  notes: list

  def title(self) -> str:
    parts = [self.dataset, *(f"{k}={v}" for k, v in self.setting),
             *([] if self.alpha is None else [f"alpha={self.alpha:g}"])]
    return " · ".join(parts) + f" (selection {self.selection}, PRO {self.pro_variant})"


def collect(sweep_dir: str | os.PathLike) -> tuple[list[tuple[tuple, dict, str, list]], list]:
  """The result rows of a sweep dir's finished tasks.

  Returns:
    ([(setting, row, results.json path, the run's notes), ...], all tasks of the manifest).
  """
  tasks = spec.read_manifest(sweep_dir)
  entries = []
  for task in tasks:
    if not task.results.exists():
      continue
    # Lists (tuples before the JSON round trip) become tuples again: settings are dict keys.
    setting = tuple((k, tuple(v) if isinstance(v, list) else v)
                    for k, v in task.overrides.items() if k not in _EXCLUDED)
    try:
      results = json.loads(task.results.read_text())
      rows, notes = results["rows"], results.get("notes", [])
    except (ValueError, KeyError) as e:
      raise spec.SweepError(f"{task.results} is not a results.json with 'rows': {e}") from e
    for row in rows:
      missing = [k for k in ("dataset", "class", "seed", *report.METRIC_KEYS) if k not in row]
      if missing:
        raise spec.SweepError(f"{task.results}: a row lacks {missing}")
      entries.append((setting, row, str(task.results), notes))
  return entries, tasks


def _stats(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
  measured = [v for v in values if v is not None]
  if not measured:
    return None, None
  std = float(np.std(measured, ddof=1)) if len(measured) > 1 else None
  return float(np.mean(measured)), std


def summarize(entries: Sequence[tuple[tuple, dict, str, list]]) -> list[Group]:
  """Groups rows by (dataset, setting, alpha, selection, PRO variant); computes the table rows.

  A group's notes are its runs' notes (e.g. random backbone weights) and the table's own.
  """
  grouped: dict[tuple, dict[str, dict[int, tuple[dict, str]]]] = {}
  run_notes: dict[tuple, list[str]] = {}
  for setting, row, source, notes in entries:
    key = (row["dataset"], setting, row.get("alpha"), row.get("selection", "last"),
           row.get("pro_variant", "standard"))
    run_notes.setdefault(key, []).extend(notes)
    by_seed = grouped.setdefault(key, {}).setdefault(row["class"], {})
    if row["seed"] in by_seed:
      raise spec.SweepError(
          f"two results for {row['dataset']}/{row['class']} seed {row['seed']} with the same "
          f"setting and alpha: {by_seed[row['seed']][1]} and {source}; give them different "
          "overrides")
    by_seed[row["seed"]] = (row, source)

  groups = []
  for key, classes in grouped.items():
    dataset, setting, alpha, selection, variant = key
    # The markdown puts the test-set-selection warning above the group's table instead.
    notes = [n for n in dict.fromkeys(run_notes[key]) if n != report.TEST_ORACLE_NOTE]
    class_stats = []
    for name, by_seed in classes.items():
      seeds = tuple(sorted(by_seed))
      metrics = {m: _stats([by_seed[s][0][m] for s in seeds]) for m in report.METRIC_KEYS}
      class_stats.append(Stats(name, seeds, metrics))
    # The mean row needs every class in each seed it averages.
    all_seeds = sorted({s for by_seed in classes.values() for s in by_seed})
    complete = [s for s in all_seeds if all(s in by_seed for by_seed in classes.values())]
    for s in sorted(set(all_seeds) - set(complete)):
      lacking = [c for c, by_seed in classes.items() if s not in by_seed]
      notes.append(f"seed {s} lacks {', '.join(lacking)}: left out of the mean row")
    mean = None
    if complete:
      per_seed = []
      for s in complete:
        seed_mean, mean_notes = report.mean_row([by_seed[s][0] for by_seed in classes.values()])
        per_seed.append(seed_mean)
        notes += [n for n in mean_notes if n not in notes]
      mean = Stats("mean", tuple(complete),
                   {m: _stats([r[m] for r in per_seed]) for m in report.METRIC_KEYS})
    groups.append(Group(dataset, setting, alpha, selection, variant, class_stats, mean, notes))
  return groups


def _pct(value: Optional[float]) -> str:
  return "-" if value is None else f"{100 * value:.1f}"


def _cell(mean: Optional[float], std: Optional[float]) -> str:
  return _pct(mean) if std is None or mean is None else f"{_pct(mean)} ± {_pct(std)}"


def _md_row(cells: Sequence[str], bold: bool = False) -> str:
  return "| " + " | ".join(f"**{c}**" if bold else c for c in cells) + " |"


def to_markdown(groups: Sequence[Group], status: str = "") -> str:
  """Markdown: a summary of every group's mean row (when several), then one table per group."""
  header = ["class", "seeds", *report.METRIC_TITLES]
  out = ["# Sweep results", ""]
  if status:
    out += [status, ""]
  out += ["Metrics in percent: mean ± sample std (n-1) over seeds; one seed gives no std. "
          "The mean row averages the classes of each seed first.", ""]
  if len(groups) > 1:
    out += ["## Summary (mean rows)", "",
            _md_row(["setting", "seeds", "classes", *report.METRIC_TITLES]),
            "|" + "---|" * (3 + len(report.METRIC_TITLES))]
    for g in groups:
      m = g.mean
      cells = [_cell(*m.metrics[k]) for k in report.METRIC_KEYS] if m else ["-"] * 5
      out.append(_md_row([g.title(), str(len(m.seeds)) if m else "0", str(len(g.classes)),
                          *cells]))
    out.append("")
  for g in groups:
    out += [f"## {g.title()}", ""]
    if g.selection == "test_oracle":
      out += [f"**{report.TEST_ORACLE_NOTE}.**", ""]
    out += [_md_row(header), "|" + "---|" * len(header)]
    for s in g.classes:
      out.append(_md_row([s.name, str(len(s.seeds)),
                          *(_cell(*s.metrics[k]) for k in report.METRIC_KEYS)]))
    if g.mean:
      out.append(_md_row([g.mean.name, str(len(g.mean.seeds)),
                          *(_cell(*g.mean.metrics[k]) for k in report.METRIC_KEYS)], bold=True))
    out.append("")
    out += [f"- {n}" for n in g.notes]
    if g.notes:
      out.append("")
  return "\n".join(out)


def to_csv(groups: Sequence[Group]) -> str:
  """One line per class and group mean; metric and <metric>_std columns in percent (1 decimal)."""
  keys = list(dict.fromkeys(k for g in groups for k, _ in g.setting))
  metric_columns = [c for m in report.METRIC_KEYS for c in (m, f"{m}_std")]
  columns = ["dataset", *keys, "alpha", "selection", "pro_variant", "class", "n_seeds", "seeds",
             *metric_columns]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
  writer.writeheader()
  for g in groups:
    for s in [*g.classes, *([g.mean] if g.mean else [])]:
      line = {"dataset": g.dataset, **{k: v for k, v in g.setting},
              "alpha": "" if g.alpha is None else g.alpha, "selection": g.selection,
              "pro_variant": g.pro_variant, "class": s.name, "n_seeds": len(s.seeds),
              "seeds": " ".join(map(str, s.seeds))}
      for m in report.METRIC_KEYS:
        mean, std = s.metrics[m]
        line[m] = "" if mean is None else _pct(mean)
        line[f"{m}_std"] = "" if std is None else _pct(std)
      writer.writerow(line)
  return buf.getvalue()


def aggregate(sweep_dir: str | os.PathLike) -> tuple[list[Group], str]:
  """Writes `<sweep_dir>/results.{md,csv}`; returns the groups and the tasks' status report."""
  entries, tasks = collect(sweep_dir)
  status, _ = spec.status_report(tasks)
  if not entries:
    raise spec.SweepError(f"no finished task in {sweep_dir} (no results.json yet)\n{status}")
  groups = summarize(entries)
  fileio.atomic_write(pathlib.Path(sweep_dir, "results.md"),
                      to_markdown(groups, status.splitlines()[0] + "."))
  fileio.atomic_write(pathlib.Path(sweep_dir, "results.csv"), to_csv(groups))
  return groups, status


_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "A folder launch.sweep wrote.", required=True)


def main(argv):
  del argv
  try:
    _, status = aggregate(_SWEEP_DIR.value)
  except spec.SweepError as e:
    sys.exit(f"launch.aggregate: error: {e}")
  print(pathlib.Path(_SWEEP_DIR.value, "results.md").read_text())
  print(status)
  print(f"wrote {pathlib.Path(_SWEEP_DIR.value, 'results.md')} and results.csv")


if __name__ == "__main__":
  app.run(main)
