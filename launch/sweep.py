r"""Sweeps: many runs of the main job (classes x seeds x hyperparameters) on SLURM or locally.

A sweep file defines `get_sweep()`, usually `return product(classes=[...], **{"train.num_runs":
[3]})` with `from launch.spec import product`; `launch.spec` describes the format and how tasks are
named. Each task is one run of `python -m pbas_jax.main` in `<sweep_dir>/<name>`, training its
seeds and alphas together (`train.num_runs`, `train.k_values`). Arguments after `--` go to every
task unchanged (e.g. `-- --config.dataset.root=/data/mvtec`). Locally, `--parallel=4
--devices_per_task=2` runs 4 tasks at once on 2 GPUs each (`launch.local`).

    python -m launch.sweep --config=configs/mvtec.py --sweep=launch/sweeps/mvtec_seeds.py \
        --sweep_dir=runs/mvtec_seeds --backend=slurm --partition=gpu --time=04:00:00 \
        --cpus_per_task=8 --mem=64G --gpus_per_task=1 -- --config.dataset.root=/data/mvtec

Files under the sweep dir:
  sweep.json                     every task launched into this dir (name, overrides, command)
  <name>/                        the task's workdir (results.json once it finished)
  logs/<name>.{out,err}          the task's stdout/stderr; logs/<name>.exit its exit status
  submit/<stamp>/array.sbatch    one SLURM job array per submission, indexing into tasks.json
  submit/<stamp>/tasks.json      the tasks of that submission (array index = list position)
  submit/<stamp>/slurm-%A_%a.*   SLURM's own per-array-task output (time limits, node errors)

Tasks whose results.json exists are skipped, as are tasks of this sweep still queued or running,
so re-running the same command submits only what is missing. The pieces: `launch.spec` (sweep
files, task names, the manifest), `launch.local` and `launch.slurm_backend` (the backends); this
module is the command line.
"""
import pathlib
import shlex
import sys
from typing import Sequence

from absl import app
from absl import flags

from launch import local
from launch import slurm_backend
from launch import spec


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command line flags; defined only when run as a program, so that `launch()` can be
  imported next to `launch.aggregate`, whose `--sweep_dir` has the same name."""
  return {
      "config": flags.DEFINE_string("config", None, "Main job config, configs/<x>.py[:preset]."),
      "sweep": flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep()."),
      "sweep_dir": flags.DEFINE_string("sweep_dir", None, "Folder of the workdirs and logs."),
      "backend": flags.DEFINE_enum("backend", "slurm", ["slurm", "local"],
                                   "slurm: one sbatch job array; local: subprocesses here."),
      "parallel": flags.DEFINE_integer("parallel", 1, "local: tasks run at once."),
      "devices_per_task": flags.DEFINE_integer(
          "devices_per_task", 0, "local: GPUs of each parallel task, from the visible ones "
          "(CUDA_VISIBLE_DEVICES per worker slot); 0 = every task sees all."),
      "partition": flags.DEFINE_string("partition", "", "slurm: partition ('' = default)."),
      "time": flags.DEFINE_string("time", "", "slurm: time limit per task, e.g. 04:00:00."),
      "cpus_per_task": flags.DEFINE_integer("cpus_per_task", 1, "slurm: CPUs per task."),
      "mem": flags.DEFINE_string("mem", "", "slurm: memory per task, e.g. 32G ('' = default)."),
      "gpus_per_task": flags.DEFINE_integer("gpus_per_task", 0, "slurm: GPUs per task."),
      "array_limit": flags.DEFINE_integer("array_limit", 0,
                                          "slurm: most tasks running at once (0: no limit)."),
      "wait": flags.DEFINE_bool("wait", False, "slurm: wait for the array to end, report failures."),
      "dry_run": flags.DEFINE_bool("dry_run", False, "Write the script / print commands only."),
      "python": flags.DEFINE_string("python", sys.executable, "Interpreter the tasks run with."),
      "run_task": flags.DEFINE_string("run_task", None,
                                      "Internal (the array script): run task INDEX of TASKS_JSON, "
                                      "given as TASKS_JSON:INDEX."),
  }


def launch(sweep_file: str, *, config: str, sweep_dir: str, backend: str,
           extra_args: Sequence[str] = (), parallel: int = 1, devices_per_task: int = 0,
           resources: slurm_backend.Resources = slurm_backend.Resources(),
           python: str = sys.executable, dry_run: bool = False, wait: bool = False,
           module: str = spec.MAIN_MODULE) -> int:
  """Launches the missing tasks of a sweep; returns a process exit code (0: nothing failed).

  With the local backend the tasks run before it returns; with SLURM they are submitted as one
  job array (and waited for with `wait`). Failed or unfinished tasks are listed with their logs.
  `parallel` and `devices_per_task` are the local backend's (`local.slot_envs`).
  """
  if backend != "local" and devices_per_task:
    raise spec.SweepError("--devices_per_task is for --backend=local; on SLURM ask for each "
                          "task's GPUs with --gpus_per_task")
  if backend == "local":
    local.slot_envs(parallel, devices_per_task)  # bad device settings fail before anything runs
  tasks = spec.make_tasks(spec.load_sweep(sweep_file), config=config, sweep_dir=sweep_dir,
                          extra_args=extra_args, python=python, module=module)
  done = [t for t in tasks if t.results.exists()]
  busy = slurm_backend.in_flight(sweep_dir) if backend == "slurm" else {}
  todo = [t for t in tasks if not t.results.exists() and t.name not in busy]
  print(f"{sweep_file}: {len(tasks)} tasks; {len(done)} finished (skipped), "
        f"{len(tasks) - len(done) - len(todo)} queued or running (skipped), {len(todo)} to run")
  for name, job in sorted(busy.items()):
    print(f"  {name}: in job {job}")
  if not todo:
    return 0
  if dry_run:
    for t in todo:
      print("  " + shlex.join(t.argv))
  else:
    spec.update_manifest(sweep_dir, tasks)
  if backend == "local":
    if dry_run:
      return 0
    local.run_local(todo, parallel, devices_per_task)
  else:
    job_id, submit_dir = slurm_backend.submit_slurm(todo, sweep_dir=sweep_dir, resources=resources,
                                                    python=python, dry_run=dry_run)
    if job_id is None:
      print(f"dry run: wrote {submit_dir / 'array.sbatch'} (not submitted)")
      return 0
    print(f"submitted job array {job_id} ({len(todo)} tasks): {submit_dir / 'array.sbatch'}\n"
          f"  task logs {pathlib.Path(sweep_dir).resolve() / 'logs'}/<name>.{{out,err}}")
    if not wait:
      return 0
    slurm_backend.wait_for_job(job_id)
  report, unfinished = spec.status_report(todo)
  print(report)
  return 1 if unfinished else 0


def main(argv, f: dict[str, flags.FlagHolder]):
  if f["run_task"].value:
    sys.exit(slurm_backend.run_array_task(f["run_task"].value))
  missing = [f"--{name}" for name in ("config", "sweep", "sweep_dir") if not f[name].value]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)}")
  resources = slurm_backend.Resources(**{k: f[k].value for k in (
      "partition", "time", "cpus_per_task", "mem", "gpus_per_task", "array_limit")})
  try:
    code = launch(f["sweep"].value, config=f["config"].value, sweep_dir=f["sweep_dir"].value,
                  backend=f["backend"].value, extra_args=argv[1:], parallel=f["parallel"].value,
                  devices_per_task=f["devices_per_task"].value,
                  resources=resources, python=f["python"].value, dry_run=f["dry_run"].value,
                  wait=f["wait"].value)
  except spec.SweepError as e:
    sys.exit(f"launch.sweep: error: {e}")
  sys.exit(code)


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
