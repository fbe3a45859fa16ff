"""A real single-node SLURM cluster runs the smoke sweep (2 tasks of 3 runs) with the real main job.

Starts munged, slurmctld and slurmd (launch.slurm), submits launch/sweeps/smoke.py with
configs/mpdd.py:smoke on the real MPDD class through sbatch, waits for the array, aggregates the
results, checks that a second submission skips the finished tasks, and stops the daemons (also
when a check fails). Needs root and `apt-get install slurm-wlm munge`; under CI=true it fails
rather than skips without them.
"""
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import require
from launch import slurm
from pbas_jax import report

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = pathlib.Path(__file__).resolve().parents[1]
# Two smoke tasks (full PBAS, ABL alone) of 3 runs each, one at a time on a small machine.
SWEEP_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def cluster():
  missing = slurm.missing_executables()
  require(not missing, f"SLURM/munge not installed (missing {missing}): "
          "apt-get install -y slurm-wlm munge")
  require(os.geteuid() == 0, "the local SLURM cluster runs its daemons as root")
  # A short folder: the munge socket path must fit a unix socket address.
  state_dir = tempfile.mkdtemp(prefix="pbas-slurm-")
  started = slurm.start_local_cluster(state_dir)
  try:
    yield started
  finally:
    slurm.stop_local_cluster(state_dir)
    shutil.rmtree(state_dir)


def _run(args, env, timeout=120):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _logs(sweep_dir: pathlib.Path) -> str:
  return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                   for p in sorted(sweep_dir.rglob("*")) if p.suffix in (".err", ".out"))


def test_smoke_sweep_on_slurm(cluster, mpdd_root, tmp_path):
  # The tasks inherit this environment through sbatch; drop the test-only forced host devices.
  env = {k: v for k, v in cluster.env.items() if k != "XLA_FLAGS"}
  cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], env=env, capture_output=True, text=True,
                        check=True).stdout.strip()
  sweep_dir = tmp_path / "sweep"
  # Every CPU per task: JAX uses all cores, so the tasks run one after another.
  command = ["-m", "launch.sweep", "--config=configs/mpdd.py:smoke",
             "--sweep=launch/sweeps/smoke.py", f"--sweep_dir={sweep_dir}", "--backend=slurm",
             f"--cpus_per_task={cpus}", "--mem=4G", "--time=00:15:00", "--wait", "--",
             f"--config.dataset.root={mpdd_root}"]

  first = _run(command, env, timeout=SWEEP_TIMEOUT_S)
  assert first.returncode == 0, f"{first.stdout}\n{first.stderr}\n{_logs(sweep_dir)}"
  assert "2 tasks; 0 finished (skipped), 0 queued or running (skipped), 2 to run" in first.stdout
  assert "submitted job array" in first.stdout
  assert "2 of 2 tasks finished, 0 failed" in first.stdout
  (submit_dir,) = (sweep_dir / "submit").iterdir()
  assert sorted(p.name for p in submit_dir.glob("slurm-*.out")) == [
      f"slurm-{(submit_dir / 'job_id').read_text().strip()}_{i}.out" for i in range(2)]

  # Each task trained its 3 seeds together: one row per run.
  names = {"True": "num_runs3", "False": "num_runs3_rboFalse_scoringcenter_distance"}
  rows = {}
  for rbo, name in names.items():
    results = json.loads((sweep_dir / "metal_plate" / name / "results.json").read_text())
    assert [(r["dataset"], r["class"], r["seed"], r["run"]) for r in results["rows"]] == [
        ("mpdd", "metal_plate", seed, seed) for seed in range(3)]
    rows[rbo] = results["rows"]

  agg = _run(["-m", "launch.aggregate", f"--sweep_dir={sweep_dir}"], env)
  assert agg.returncode == 0, agg.stderr
  with open(sweep_dir / "results.csv") as f:
    table = {(r["model.rbo"] or "True", r["class"]): r for r in csv.DictReader(f)}
  assert set(table) == {(rbo, c) for rbo in names for c in ("metal_plate", "mean")}
  for (rbo, name), line in table.items():  # one class: the mean row equals the class row
    assert line["n_seeds"] == "3" and line["seeds"] == "0 1 2"
    for m in report.METRIC_KEYS:
      values = [row[m] for row in rows[rbo]]
      if None in values:
        assert line[m] == ""
        continue
      assert line[m] == f"{100 * np.mean(values):.1f}"
      assert line[f"{m}_std"] == f"{100 * np.std(values, ddof=1):.1f}"
  md = (sweep_dir / "results.md").read_text()
  assert md.count("| metal_plate | 3 |") == 2 and md.count("| **mean** | **3** |") == 2

  # Submitting again finds everything finished: nothing is submitted.
  again = _run(command, env)
  assert again.returncode == 0, again.stderr
  assert "2 tasks; 2 finished (skipped), 0 queued or running (skipped), 0 to run" in again.stdout
  assert len(list((sweep_dir / "submit").iterdir())) == 1

  # With one result gone, only that task is (dry-run) submitted, as array index 0.
  (sweep_dir / "metal_plate" / names["False"] / "results.json").unlink()
  dry = _run([*command[:-2], "--dry_run", *command[-2:]], env)
  assert dry.returncode == 0, dry.stderr
  (newest,) = [p for p in (sweep_dir / "submit").iterdir() if p != submit_dir]
  assert [t["name"] for t in json.loads((newest / "tasks.json").read_text())] == [
      f"metal_plate/{names['False']}"]
  assert "#SBATCH --array=0-0\n" in (newest / "array.sbatch").read_text()
  assert not (newest / "job_id").exists()


def test_failed_task_is_reported_with_its_log(cluster, tmp_path):
  """A bad override makes the real main job fail; the sweep names the task and its log."""
  env = {k: v for k, v in cluster.env.items() if k != "XLA_FLAGS"}
  sweep_file = tmp_path / "bad.py"
  sweep_file.write_text("def get_sweep():\n  return [{'model.no_such_key': 1}]\n")
  sweep_dir = tmp_path / "sweep"
  result = _run(["-m", "launch.sweep", "--config=configs/mpdd.py:smoke", f"--sweep={sweep_file}",
                 f"--sweep_dir={sweep_dir}", "--backend=slurm", "--wait"], env, timeout=300)
  assert result.returncode == 1, result.stdout + result.stderr
  log = sweep_dir / "logs" / "all" / "no_such_key1"
  assert f"all/no_such_key1: FAILED with exit 1; log {log}.err" in result.stdout
  assert "no_such_key" in pathlib.Path(f"{log}.err").read_text()
