"""Sweeps (expansion, naming, skipping, job arrays, local runs) and their aggregated tables.

SLURM is replaced by small fake `sbatch`/`squeue` scripts and the main job by a fake module that
writes a results.json; tests/test_slurm.py runs the real ones.
"""
import csv
import json
import os
import pathlib
import re
import stat
import subprocess
import sys

import numpy as np
import pytest

from launch import aggregate
from launch import local
from launch import slurm_backend
from launch import spec
from launch import sweep
from pbas_jax import report
from pbas_jax.data.builders import CLASSES

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/mpdd.py:smoke"

# A stand-in for pbas_jax.main: writes <workdir>/results.json with metrics made from the seed,
# alpha and class (one row per class, alpha of `train.k_values` (else `model.k`) and seed of
# `train.seed .. + train.num_runs - 1`, as the engine's runs), or fails like an unknown config key
# does. With $FAKE_LOCKS set it holds a lock file per GPU of its CUDA_VISIBLE_DEVICES while it
# runs and fails if another task holds one of them.
FAKE_MAIN = '''
import json, os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
over = {k[len("config."):]: v for k, v in args.items() if k.startswith("config.")}
print("fake main", over)
print("env", os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
if "model.bogus" in over:
  sys.exit("KeyError: 'bogus' is not a key of config.model")
if os.environ.get("FAKE_LOCKS"):
  locks = [os.path.join(os.environ["FAKE_LOCKS"], "gpu" + d)
           for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",")]
  for lock in locks:
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL))  # FileExistsError: a GPU shared by two tasks
  time.sleep(0.5)
  for lock in locks:
    os.remove(lock)
first = int(over.get("train.seed", 0))
seeds = range(first, first + int(over.get("train.num_runs", 1)))
alphas = over.get("train.k_values", over.get("model.k", "0.25")).strip("()").split(",")
runs = [(float(alpha), seed) for alpha in alphas for seed in seeds]
rows = [{"dataset": "mpdd", "class": c, "seed": seed, "run": r, "alpha": alpha,
         "i_auroc": 0.5 + 0.1 * seed + alpha, "i_ap": 0.6, "p_auroc": 0.7,
         "p_ap": 0.1 * (i + 1), "p_pro": None, "pro_variant": "standard", "epoch": 3,
         "selection": "last", "wall_time_s": 1.0, "images_per_s": 2.0}
        for i, c in enumerate(over.get("dataset.classes", "x,y").split(","))
        for r, (alpha, seed) in enumerate(runs)]
os.makedirs(args["workdir"], exist_ok=True)
with open(os.path.join(args["workdir"], "results.json"), "w") as f:
  json.dump({"rows": rows, "mean": {}, "selection": "last", "notes": []}, f)
'''


def _write_sweep(tmp_path, body: str) -> pathlib.Path:
  path = tmp_path / "my_sweep.py"
  path.write_text("from launch.spec import product\n\n\ndef get_sweep():\n  return " + body + "\n")
  return path


@pytest.fixture
def fake_main(tmp_path, monkeypatch) -> str:
  folder = tmp_path / "fake_pkg"
  folder.mkdir()
  (folder / "fake_main.py").write_text(FAKE_MAIN)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(REPO)]))
  monkeypatch.chdir(REPO)
  return "fake_main"


def _executable(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> pathlib.Path:
  """`sbatch` that records its arguments and answers job 4242; `squeue` that prints $FAKE_LIVE."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "sbatch_calls.txt"
  _executable(bin_dir / "sbatch", f'#!/bin/sh\necho "$@" >> {calls}\necho "4242;cluster"\n')
  _executable(bin_dir / "squeue", '#!/bin/sh\nprintf "%s" "$FAKE_LIVE"\n')
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_LIVE", "")
  monkeypatch.chdir(REPO)
  return calls


def test_product_is_the_cartesian_product_with_aliases():
  tasks = spec.product(classes=["a", "b"], seeds=[0, 1], **{"model.k": [0.3]})
  assert tasks == [
      {"dataset.classes": c, "train.seed": s, "model.k": 0.3} for c in "ab" for s in (0, 1)]
  assert [list(t) for t in tasks] == [["dataset.classes", "train.seed", "model.k"]] * 4
  with pytest.raises(spec.SweepError, match=r"classes=\['bottle'\]"):
    spec.product(classes="bottle")
  with pytest.raises(spec.SweepError, match="empty axis"):
    spec.product(seeds=[])


@pytest.mark.parametrize("body, message", [
    (None, "no such file"),
    ("[{'train.seed': 0}]\nsyntax error here", "failed to load: SyntaxError"),
    ("1 / 0", "get_sweep\\(\\) raised ZeroDivisionError"),
    ("{'train.seed': [0, 1]}", "non-empty list of override dicts"),
    ("[]", "non-empty list"),
    ("[{'train.seed': 0}, 'model.k=1']", "task 1 is 'model.k=1'"),
])
def test_bad_sweep_files_name_the_file(tmp_path, body, message):
  path = tmp_path / "missing.py" if body is None else _write_sweep(tmp_path, body)
  with pytest.raises(spec.SweepError, match=message) as e:
    spec.load_sweep(path)
  assert str(path) in str(e.value)


def test_sweep_file_without_get_sweep(tmp_path):
  path = tmp_path / "s.py"
  path.write_text("SWEEP = []\n")
  with pytest.raises(spec.SweepError, match="defines no get_sweep"):
    spec.load_sweep(path)


def test_example_sweeps_put_seeds_and_alphas_inside_a_task():
  """Tasks differ only in what changes the compiled program; seeds and alphas are runs of one."""
  sweeps = {name: spec.load_sweep(REPO / "launch" / "sweeps" / f"{name}.py")
            for name in ("mvtec_seeds", "alpha_curve", "smoke")}
  mvtec = sorted(CLASSES["mvtec"])
  assert sorted(t[spec.CLASS_KEY] for t in sweeps["mvtec_seeds"]) == mvtec
  assert all(t["train.num_runs"] == 3 for t in sweeps["mvtec_seeds"])
  assert sorted(t[spec.CLASS_KEY] for t in sweeps["alpha_curve"]) == mvtec
  for task in sweeps["alpha_curve"]:
    assert len(task["train.k_values"]) == 6 and {0.25, 0.3} <= set(task["train.k_values"])
  assert [t["train.num_runs"] for t in sweeps["smoke"]] == [3, 3]
  for name, tasks in sweeps.items():
    assert len({json.dumps(t, sort_keys=True) for t in tasks}) == len(tasks), name
    varying = {k for k in {k for t in tasks for k in t}
               if len({json.dumps(t.get(k)) for t in tasks}) > 1}
    assert not varying & {spec.SEED_KEY, "model.k", *spec.RUN_KEYS}, (name, varying)
    # Each task's command line trains its runs: `--config.train.k_values=(0.1, ...)` etc.
    (task, *_) = spec.make_tasks(tasks, config=str(REPO / CONFIG), sweep_dir="/sw")
    for key in set(spec.RUN_KEYS) & set(task.overrides):
      assert f"--config.{key}={spec.format_value(task.overrides[key])}" in task.argv


def test_task_names():
  names = spec.task_names([
      {"dataset.classes": "bottle", "train.seed": 0, "model.k": 0.25},
      {"dataset.classes": "bottle,screw", "train.seed": 1, "model.k": 1e-5},
      {"train.seed": 2},
      {"dataset.classes": "metal_plate"},
      {"dataset.classes": "pill", "backbone.layers": ("layer2", "layer3")},
  ])
  assert names == ["bottle/seed0_k0.25", "bottle+screw/seed1_k1e-05", "all/seed2",
                   "metal_plate/default", "pill/layerslayer2+layer3"]
  # Keys sharing a last component are spelled out.
  assert spec.task_names([{"optim.lr": 0.1}, {"model.lr": 0.2}]) == [
      "all/optim-lr0.1", "all/model-lr0.2"]
  with pytest.raises(spec.SweepError, match="tasks 0 and 1 both get the workdir name 'all/ab'"):
    spec.task_names([{"model.a": "b"}, {"model.a": "b"}])


def test_make_tasks(tmp_path):
  tasks = spec.make_tasks(spec.product(classes=["c1"], **{"model.k": [0.1, 0.3]}),
                          config=str(REPO / CONFIG), sweep_dir=tmp_path / "sw",
                          extra_args=["--config.dataset.root=/data"], python="/py")
  assert [t.name for t in tasks] == ["c1/k0.1", "c1/k0.3"]
  assert tasks[1].argv == (
      "/py", "-m", "pbas_jax.main", f"--config={REPO / CONFIG}",
      f"--workdir={tmp_path / 'sw' / 'c1' / 'k0.3'}", "--config.dataset.root=/data",
      "--config.dataset.classes=c1", "--config.model.k=0.3")
  assert tasks[0].log == str(tmp_path / "sw" / "logs" / "c1" / "k0.1")
  assert tasks[0].results == tmp_path / "sw" / "c1" / "k0.1" / "results.json"
  with pytest.raises(spec.SweepError, match="model.k is set both by the sweep and after `--`"):
    spec.make_tasks([{"model.k": 1}], config=str(REPO / CONFIG), sweep_dir=tmp_path,
                    extra_args=["--config.model.k=2"])
  with pytest.raises(spec.SweepError, match="file configs/nope.py not found"):
    spec.make_tasks([{"model.k": 1}], config="configs/nope.py:smoke", sweep_dir=tmp_path)
  with pytest.raises(spec.SweepError, match="must be a flag"):
    spec.make_tasks([{"model.k": 1}], config=str(REPO / CONFIG), sweep_dir=tmp_path,
                    extra_args=["oops"])


def test_array_script_contents(tmp_path):
  resources = slurm_backend.Resources(partition="gpu", time="04:00:00", cpus_per_task=8,
                                      mem="32G", gpus_per_task=1, array_limit=4)
  text = slurm_backend.array_script(tasks_json=tmp_path / "tasks.json", num_tasks=7,
                                    resources=resources, name="pbas-x", submit_dir=tmp_path,
                                    chdir="/repo", python="/venv/py")
  directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
  assert directives == [
      "#SBATCH --job-name=pbas-x", "#SBATCH --array=0-6%4",
      f"#SBATCH --output={tmp_path}/slurm-%A_%a.out", f"#SBATCH --error={tmp_path}/slurm-%A_%a.err",
      "#SBATCH --chdir=/repo", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=8",
      "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00", "#SBATCH --mem=32G",
      "#SBATCH --gpus-per-task=1"]
  assert text.splitlines()[-1] == (
      f'exec /venv/py -m launch.sweep --run_task={tmp_path}/tasks.json:"$SLURM_ARRAY_TASK_ID"')
  minimal = slurm_backend.array_script(tasks_json="t.json", num_tasks=1,
                                       resources=slurm_backend.Resources(), name="n",
                                       submit_dir=tmp_path, chdir="/repo")
  assert "#SBATCH --array=0-0\n" in minimal
  assert not re.search(r"--(partition|time|mem|gpus-per-task)=", minimal)


def _submit_dirs(sweep_dir: pathlib.Path) -> list:
  return sorted((sweep_dir / "submit").iterdir()) if (sweep_dir / "submit").exists() else []


def test_slurm_submission_skips_finished_and_running_tasks(tmp_path, fake_slurm, fake_main,
                                                           monkeypatch, capsys):
  sweep_file = _write_sweep(tmp_path, "product(classes=['a'], seeds=[0, 1, 2])")
  sweep_dir = tmp_path / "sw"
  finished = sweep_dir / "a" / "seed1" / "results.json"
  finished.parent.mkdir(parents=True)
  finished.write_text("{}")
  kwargs = dict(config=CONFIG, sweep_dir=str(sweep_dir), backend="slurm",
                resources=slurm_backend.Resources(cpus_per_task=2), module=fake_main)

  assert sweep.launch(str(sweep_file), **kwargs) == 0
  (submit_dir,) = _submit_dirs(sweep_dir)
  assert fake_slurm.read_text().split() == ["--parsable", str(submit_dir / "array.sbatch")]
  assert (submit_dir / "job_id").read_text().strip() == "4242"
  # Only the missing tasks, remapped to array indices 0 and 1.
  submitted = json.loads((submit_dir / "tasks.json").read_text())
  assert [t["name"] for t in submitted] == ["a/seed0", "a/seed2"]
  script = (submit_dir / "array.sbatch").read_text()
  assert "#SBATCH --array=0-1\n" in script and "#SBATCH --cpus-per-task=2\n" in script
  assert [t.name for t in spec.read_manifest(sweep_dir)] == ["a/seed0", "a/seed1", "a/seed2"]
  assert "3 tasks; 1 finished (skipped), 0 queued or running (skipped), 2 to run" in \
      capsys.readouterr().out

  # The array task runs its entry of tasks.json (here through bash instead of sbatch).
  run = subprocess.run(["bash", str(submit_dir / "array.sbatch")], capture_output=True,
                       text=True, env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"})
  assert run.returncode == 0, run.stderr
  assert "a/seed2 exited with 0" in run.stdout
  assert (sweep_dir / "a" / "seed2" / "results.json").exists()
  assert not (sweep_dir / "a" / "seed0" / "results.json").exists()
  assert "fake main" in (sweep_dir / "logs" / "a" / "seed2.out").read_text()

  # While job 4242 is live its unfinished task is not submitted again.
  monkeypatch.setenv("FAKE_LIVE", "4242\n")
  assert sweep.launch(str(sweep_file), **kwargs) == 0
  assert len(_submit_dirs(sweep_dir)) == 1
  out = capsys.readouterr().out
  assert "2 finished (skipped), 1 queued or running (skipped), 0 to run" in out
  assert "a/seed0: in job 4242" in out

  # Once it ended, the one missing task is resubmitted alone, as array index 0.
  monkeypatch.setenv("FAKE_LIVE", "")
  assert sweep.launch(str(sweep_file), **kwargs) == 0
  newest = _submit_dirs(sweep_dir)[-1]
  assert [t["name"] for t in json.loads((newest / "tasks.json").read_text())] == ["a/seed0"]
  assert "#SBATCH --array=0-0\n" in (newest / "array.sbatch").read_text()


def test_dry_run_and_missing_sbatch(tmp_path, fake_main, monkeypatch, capsys):
  sweep_file = _write_sweep(tmp_path, "product(seeds=[0, 1])")
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no squeue
  kwargs = dict(config=CONFIG, sweep_dir=str(tmp_path / "sw"), backend="slurm",
                python=sys.executable, module=fake_main)
  assert sweep.launch(str(sweep_file), dry_run=True, **kwargs) == 0
  (submit_dir,) = _submit_dirs(tmp_path / "sw")
  assert (submit_dir / "array.sbatch").exists() and not (submit_dir / "job_id").exists()
  assert "all/seed1" in capsys.readouterr().out
  with pytest.raises(spec.SweepError, match="`sbatch` not found on PATH.*--backend=local"):
    sweep.launch(str(sweep_file), **kwargs)
  with pytest.raises(spec.SweepError, match="contains whitespace"):
    sweep.launch(str(sweep_file), dry_run=True, **{**kwargs, "sweep_dir": str(tmp_path / "a b")})


def test_local_backend_reports_the_failed_task_and_its_log(tmp_path, fake_main, capsys):
  sweep_file = _write_sweep(
      tmp_path, "product(classes=['a', 'b'], seeds=[0]) + [{'classes': 'a', 'model.bogus': 1}]")
  sweep_dir = tmp_path / "sw"
  kwargs = dict(config=CONFIG, sweep_dir=str(sweep_dir), backend="local", parallel=2,
                module=fake_main)
  assert sweep.launch(str(sweep_file), **kwargs) == 1
  out = capsys.readouterr().out
  bad_log = sweep_dir / "logs" / "a" / "bogus1"
  assert "2 of 3 tasks finished, 1 failed" in out
  assert f"a/bogus1: FAILED with exit 1; log {bad_log}.err" in out
  assert "'bogus' is not a key of config.model" in out  # the end of its stderr
  assert (bad_log.with_suffix(".exit")).read_text().strip() == "1"
  assert (sweep_dir / "logs" / "b" / "seed0.exit").read_text().strip() == "0"
  # A second launch runs only the failed task again.
  assert sweep.launch(str(sweep_file), **kwargs) == 1
  assert "2 finished (skipped), 0 queued or running (skipped), 1 to run" in capsys.readouterr().out


@pytest.mark.parametrize("body, extra_args, settings, seeds", [
    # The shipped sweeps' way: one task trains both seeds and both alphas (4 runs).
    ("product(classes=['a'], **{'train.num_runs': [2], 'train.k_values': [(0.1, 0.3)]})", [],
     [(), ()], (0, 1)),
    # One task of 3 seeds, from seed 5, both alphas given to every task.
    ("product(classes=['a'], seeds=[5], **{'train.num_runs': [3]})",
     ["--config.train.k_values=0.1,0.3"], [(), ()], (5, 6, 7)),
    # One process per seed, each training both alphas.
    ("product(classes=['a'], seeds=[0, 1])", ["--config.train.k_values=0.1,0.3"], [(), ()],
     (0, 1)),
    # One process per seed and alpha.
    ("product(classes=['a'], seeds=[0, 1], **{'model.k': [0.1, 0.3]})", [],
     [(("model.k", 0.1),), (("model.k", 0.3),)], (0, 1)),
])
def test_local_sweep_over_two_alphas_aggregates_into_one_table(tmp_path, fake_main, body,
                                                               extra_args, settings, seeds):
  sweep_file = _write_sweep(tmp_path, body)
  sweep_dir = tmp_path / "sw"
  assert sweep.launch(str(sweep_file), config=CONFIG, sweep_dir=str(sweep_dir), backend="local",
                      extra_args=extra_args, module=fake_main) == 0
  groups, status = aggregate.aggregate(sweep_dir)
  n = len(spec.read_manifest(sweep_dir))
  assert status == f"{n} of {n} tasks finished, 0 failed, 0 without a result"
  assert [(g.setting, g.alpha) for g in groups] == [(settings[0], 0.1), (settings[1], 0.3)]
  for g in groups:  # fake i_auroc: 0.5 + 0.1 seed + alpha, over the seeds of this alpha only
    for stats in (*g.classes, g.mean):
      assert stats.seeds == seeds
      mean, std = stats.metrics["i_auroc"]
      assert mean == pytest.approx(0.5 + 0.1 * np.mean(seeds) + g.alpha)
      assert std == pytest.approx(0.1 * np.std(seeds, ddof=1))
  md = (sweep_dir / "results.md").read_text()
  assert md.count("## ") == 3  # the summary and one table per alpha
  assert " · alpha=0.1 (selection last" in md and " · alpha=0.3 (selection last" in md
  assert "num_runs" not in md and "k_values" not in md  # runs of a task are not a setting
  with open(sweep_dir / "results.csv") as f:
    means = [(r["alpha"], r["i_auroc"], r["n_seeds"]) for r in csv.DictReader(f)
             if r["class"] == "mean"]
  assert means == [(str(alpha), f"{100 * (0.5 + 0.1 * np.mean(seeds) + alpha):.1f}",
                    str(len(seeds))) for alpha in (0.1, 0.3)]


def test_tasks_split_over_seed_ranges_aggregate_together(tmp_path, fake_main):
  """Two tasks of 2 runs each (seeds 0-1 and 2-3) give one table over 4 seeds; two tasks with
  overlapping seeds are refused, naming both results."""
  sweep_file = _write_sweep(tmp_path, "product(classes=['a', 'b'], seeds=[0, 2], "
                                      "**{'train.num_runs': [2]})")
  sweep_dir = tmp_path / "sw"
  assert sweep.launch(str(sweep_file), config=CONFIG, sweep_dir=str(sweep_dir), backend="local",
                      module=fake_main) == 0
  (group,) = aggregate.aggregate(sweep_dir)[0]
  assert group.setting == () and group.alpha == 0.25
  assert [(s.name, s.seeds) for s in group.classes] == [("a", (0, 1, 2, 3)), ("b", (0, 1, 2, 3))]
  assert group.mean.metrics["i_auroc"] == (pytest.approx(0.5 + 0.15 + 0.25),
                                           pytest.approx(0.1 * np.std(range(4), ddof=1)))
  overlap = _write_sweep(tmp_path, "product(classes=['a'], seeds=[1], **{'train.num_runs': [2]})")
  assert sweep.launch(str(overlap), config=CONFIG, sweep_dir=str(sweep_dir), backend="local",
                      module=fake_main) == 0
  with pytest.raises(spec.SweepError, match="two results for mpdd/a seed 1"):
    aggregate.aggregate(sweep_dir)


@pytest.mark.parametrize("environ, parallel, per_task, expected", [
    ({}, 1, 0, [{}]),  # one worker: the environment as it is
    ({}, 2, 0, [{"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}] * 2),
    ({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".2"}, 2, 0, [{}, {}]),  # the user's own setting
    ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 2, 2,
     [{"CUDA_VISIBLE_DEVICES": "4,5", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
      {"CUDA_VISIBLE_DEVICES": "6,7", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}]),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2", "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, 3, 1,
     [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"},
      {"CUDA_VISIBLE_DEVICES": "2"}]),
    ({"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}, 1, 1, [{"CUDA_VISIBLE_DEVICES": "GPU-a"}]),
])
def test_slot_envs_give_each_worker_its_own_gpus(environ, parallel, per_task, expected):
  assert local.slot_envs(parallel, per_task, environ) == expected


def test_slot_envs_refuse_what_the_gpus_cannot_hold(monkeypatch, tmp_path):
  with pytest.raises(spec.SweepError, match=r"needs 6 GPUs, 4 are visible \(0,1,2,3\); lower "
                                            r"--parallel to 2"):
    local.slot_envs(3, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
  with pytest.raises(spec.SweepError, match="--parallel=0"):
    local.slot_envs(0)
  monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
  with pytest.raises(spec.SweepError, match="no GPU found.*set CUDA_VISIBLE_DEVICES"):
    local.slot_envs(1, 1, {"PATH": str(tmp_path)})
  _executable(tmp_path / "nvidia-smi", "#!/bin/sh\nprintf '0\\n1\\n'\n")  # two GPUs
  assert local.slot_envs(2, 1, {}) == [
      {"CUDA_VISIBLE_DEVICES": "0", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
      {"CUDA_VISIBLE_DEVICES": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}]
  with pytest.raises(spec.SweepError, match="--devices_per_task is for --backend=local"):
    sweep.launch("unused.py", config=CONFIG, sweep_dir=str(tmp_path), backend="slurm",
                 devices_per_task=1)


def test_local_workers_never_share_a_gpu(tmp_path, fake_main, monkeypatch, capsys):
  """4 tasks, 2 at a time on 1 GPU each of 2: each task sees one GPU and no other running task
  holds it (the fake main fails on a GPU another task holds)."""
  (tmp_path / "locks").mkdir()
  monkeypatch.setenv("FAKE_LOCKS", str(tmp_path / "locks"))
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  sweep_file = _write_sweep(tmp_path, "product(classes=['a', 'b', 'c', 'd'])")
  sweep_dir = tmp_path / "sw"
  assert sweep.launch(str(sweep_file), config=CONFIG, sweep_dir=str(sweep_dir), backend="local",
                      parallel=2, devices_per_task=1, module=fake_main) == 0, \
      capsys.readouterr().out
  out = capsys.readouterr().out
  assert "worker slot 0: CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_PREALLOCATE=false" in out
  assert "worker slot 1: CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_PREALLOCATE=false" in out
  seen = [(sweep_dir / "logs" / c / "default.out").read_text().splitlines()[1] for c in "abcd"]
  assert set(seen) <= {"env 0 false", "env 1 false"} and len(set(seen)) == 2, seen
  assert not list((tmp_path / "locks").iterdir())


@pytest.mark.slow
def test_real_main_job_alpha_curve_aggregates_per_alpha(tmp_path, mpdd_root, monkeypatch):
  """The real main job (smoke config, one epoch) trains two alphas in one task on MPDD."""
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("PBAS_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one host device, as a real run
  sweep_file = _write_sweep(tmp_path, "product(classes=['metal_plate'], seeds=[0])")
  sweep_dir = tmp_path / "sw"
  extra_args = [f"--config.dataset.root={mpdd_root}", "--config.train.k_values=0.1,0.3",
                "--config.backbone.name=resnet18", "--config.train.epochs=1",
                "--config.eval.heatmaps=0"]
  code = sweep.launch(str(sweep_file), config=CONFIG, sweep_dir=str(sweep_dir),
                      backend="local", extra_args=extra_args)
  assert code == 0, (sweep_dir / "logs" / "metal_plate" / "seed0.err").read_text()[-3000:]
  groups, _ = aggregate.aggregate(sweep_dir)
  assert [(g.dataset, g.alpha, [s.name for s in g.classes]) for g in groups] == [
      ("mpdd", 0.1, ["metal_plate"]), ("mpdd", 0.3, ["metal_plate"])]
  rows = json.loads((sweep_dir / "metal_plate" / "seed0" / "results.json").read_text())["rows"]
  for g, row in zip(groups, rows):
    assert row["alpha"] == g.alpha and g.mean.metrics["i_auroc"] == (row["i_auroc"], None)


def _results(workdir: pathlib.Path, rows: list, notes=()) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.json").write_text(json.dumps({"rows": rows, "mean": {}, "selection": "last",
                                                    "notes": list(notes)}))


def _row(cls, seed, rng, with_masks=True):
  pixel = lambda: float(rng.uniform(0.5, 1.0)) if with_masks else None
  return {"dataset": "mvtec", "class": cls, "seed": seed, "i_auroc": float(rng.uniform(0.5, 1.0)),
          "i_ap": float(rng.uniform(0.5, 1.0)), "p_auroc": pixel(), "p_ap": pixel(),
          "p_pro": pixel(), "pro_variant": "standard", "epoch": 640, "selection": "last",
          "wall_time_s": 10.0, "images_per_s": 5.0}


def _expected(values):
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  mean = f"{100 * np.mean(values):.1f}"
  return mean if len(values) == 1 else f"{mean} ± {100 * np.std(values, ddof=1):.1f}"


def test_aggregate_tables(tmp_path):
  rng = np.random.default_rng(0)
  sweep_dir = tmp_path / "sw"
  classes, seeds, ks = ["bottle", "screw", "grid"], [0, 1, 2], [0.25, 0.5]
  tasks = spec.make_tasks(spec.product(classes=classes, seeds=seeds, **{"model.k": ks}) +
                          spec.product(classes=["bottle"], seeds=[0], **{"model.k": [0.75]}),
                          config=str(REPO / CONFIG), sweep_dir=sweep_dir)
  spec.update_manifest(sweep_dir, tasks)
  rows = {}
  for task in tasks[:-1]:  # the last task (k=0.75) never finished
    o = task.overrides
    # grid has no masks: its pixel metrics are null.
    row = _row(o["dataset.classes"], o["train.seed"], rng, o["dataset.classes"] != "grid")
    rows[o["model.k"], row["class"], row["seed"]] = row
    _results(pathlib.Path(task.workdir), [row])

  groups, status = aggregate.aggregate(sweep_dir)
  assert status.startswith("18 of 19 tasks finished, 0 failed, 1 without a result")
  assert "bottle/seed0_k0.75: no results.json" in status
  assert [g.setting for g in groups] == [(("model.k", 0.25),), (("model.k", 0.5),)]
  md = (sweep_dir / "results.md").read_text()
  with open(sweep_dir / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 2 * (len(classes) + 1)
  for k in ks:
    assert f"## mvtec · model.k={k} (selection last, PRO standard)" in md
    for cls in classes:
      cells = [_expected([rows[k, cls, s][m] for s in seeds]) for m in report.METRIC_KEYS]
      assert f"| {cls} | 3 | {' | '.join(cells)} |" in md
      (line,) = [r for r in table if r["model.k"] == str(k) and r["class"] == cls]
      assert line["n_seeds"] == "3" and line["seeds"] == "0 1 2"
      assert line["i_auroc"] == f"{100 * np.mean([rows[k, cls, s]['i_auroc'] for s in seeds]):.1f}"
      assert line["p_auroc"] == ("" if cls == "grid" else cells[2].split(" ± ")[0])
    # Mean row: classes averaged within each seed (pixel metrics over the classes with masks).
    per_seed = {m: [np.mean([rows[k, c, s][m] for c in classes if rows[k, c, s][m] is not None])
                    for s in seeds] for m in report.METRIC_KEYS}
    cells = [f"**{_expected(per_seed[m])}**" for m in report.METRIC_KEYS]
    assert f"| **mean** | **3** | {' | '.join(cells)} |" in md
    (line,) = [r for r in table if r["model.k"] == str(k) and r["class"] == "mean"]
    assert line["p_pro_std"] == f"{100 * np.std(per_seed['p_pro'], ddof=1):.1f}"
  assert "mean p_auroc is over 2 of 3 rows" in md
  assert "## Summary (mean rows)" in md


def test_aggregate_single_seed_incomplete_and_duplicates(tmp_path):
  rng = np.random.default_rng(1)
  sweep_dir = tmp_path / "sw"
  tasks = spec.make_tasks(spec.product(classes=["a", "b"], seeds=[0]) + [{"train.seed": 1}],
                          config=str(REPO / CONFIG), sweep_dir=sweep_dir)
  spec.update_manifest(sweep_dir, tasks)
  a0, b0, a1 = _row("a", 0, rng), _row("b", 0, rng), _row("a", 1, rng)
  _results(pathlib.Path(tasks[0].workdir), [a0])
  _results(pathlib.Path(tasks[1].workdir), [b0], notes=["backbone weights are random"])
  _results(pathlib.Path(tasks[2].workdir), [a1])  # an all-classes run that only produced `a`
  (group,) = aggregate.aggregate(sweep_dir)[0]
  assert [(s.name, s.seeds) for s in group.classes] == [("a", (0, 1)), ("b", (0,))]
  assert group.mean.seeds == (0,)
  assert group.mean.metrics["i_auroc"] == (pytest.approx((a0["i_auroc"] + b0["i_auroc"]) / 2), None)
  assert group.notes == ["backbone weights are random", "seed 1 lacks b: left out of the mean row"]
  md = (sweep_dir / "results.md").read_text()
  assert f"| b | 1 | {100 * b0['i_auroc']:.1f} |" in md  # one seed: no std

  _results(pathlib.Path(tasks[2].workdir), [{**a1, "seed": 0}])
  with pytest.raises(spec.SweepError, match="two results for mvtec/a seed 0"):
    aggregate.aggregate(sweep_dir)


def test_aggregate_without_results(tmp_path):
  with pytest.raises(spec.SweepError, match="not a sweep dir"):
    aggregate.aggregate(tmp_path)
  spec.update_manifest(tmp_path, spec.make_tasks([{"train.seed": 0}], config=str(REPO / CONFIG),
                                                 sweep_dir=tmp_path))
  with pytest.raises(spec.SweepError, match="no finished task"):
    aggregate.aggregate(tmp_path)


def test_aggregate_keeps_protocols_apart_and_flags_test_set_selection(tmp_path):
  rng = np.random.default_rng(2)
  tasks = spec.make_tasks(spec.product(seeds=[0, 1]), config=str(REPO / CONFIG),
                          sweep_dir=tmp_path)
  spec.update_manifest(tmp_path, tasks)
  _results(pathlib.Path(tasks[0].workdir), [_row("a", 0, rng)])
  _results(pathlib.Path(tasks[1].workdir), [{**_row("a", 1, rng), "selection": "test_oracle"}],
           notes=[report.TEST_ORACLE_NOTE])
  groups, _ = aggregate.aggregate(tmp_path)
  assert [(g.selection, g.mean.seeds, g.notes) for g in groups] == [
      ("last", (0,), []), ("test_oracle", (1,), [])]
  md = (tmp_path / "results.md").read_text()
  assert md.count(report.TEST_ORACLE_NOTE) == 1
  assert md.index(report.TEST_ORACLE_NOTE) > md.index("## mvtec (selection test_oracle")
