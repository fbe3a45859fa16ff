"""The SLURM backend: a sweep's missing tasks as one job array per submission.

    <sweep_dir>/submit/<stamp>/array.sbatch    the job array; array task i runs task i of
    <sweep_dir>/submit/<stamp>/tasks.json      (array index = list position)
    <sweep_dir>/submit/<stamp>/job_id          its SLURM job id once submitted
    <sweep_dir>/submit/<stamp>/slurm-%A_%a.*   SLURM's own per-array-task output (time limits,
                                               node errors)

Every array of a sweep dir has the same job name (`job_name`), so `in_flight` finds its tasks still
queued or running and a second submission skips them.
"""
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

from launch import local
from launch import spec
from pbas_jax import fileio

# squeue states of a job that may still run a task (anything else has ended).
_LIVE_STATES = "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED,REQUEUED,RESIZING,STOPPED"


@dataclasses.dataclass(frozen=True)
class Resources:
  """What one array task asks SLURM for; empty strings and 0 leave the cluster's default."""
  partition: str = ""
  time: str = ""
  cpus_per_task: int = 1
  mem: str = ""
  gpus_per_task: int = 0
  array_limit: int = 0  # most array tasks running at once; 0 = no limit


def job_name(sweep_dir: str | os.PathLike) -> str:
  """The SLURM job name of a sweep dir's arrays: finds its jobs in squeue."""
  path = str(pathlib.Path(sweep_dir).resolve())
  return f"pbas-{pathlib.Path(path).name[:40]}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def array_script(*, tasks_json: str | os.PathLike, num_tasks: int, resources: Resources,
                 name: str, submit_dir: str | os.PathLike, chdir: str | os.PathLike,
                 python: str = sys.executable) -> str:
  """The sbatch script of one job array: array task i runs task i of `tasks_json`."""
  if num_tasks < 1:
    raise spec.SweepError("a job array needs at least one task")
  array = f"0-{num_tasks - 1}" + (f"%{resources.array_limit}" if resources.array_limit else "")
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={name}",
           f"#SBATCH --array={array}",
           f"#SBATCH --output={pathlib.Path(submit_dir, 'slurm-%A_%a.out')}",
           f"#SBATCH --error={pathlib.Path(submit_dir, 'slurm-%A_%a.err')}",
           f"#SBATCH --chdir={chdir}",
           "#SBATCH --ntasks=1",
           f"#SBATCH --cpus-per-task={resources.cpus_per_task}"]
  if resources.partition:
    lines.append(f"#SBATCH --partition={resources.partition}")
  if resources.time:
    lines.append(f"#SBATCH --time={resources.time}")
  if resources.mem:
    lines.append(f"#SBATCH --mem={resources.mem}")
  if resources.gpus_per_task:
    lines.append(f"#SBATCH --gpus-per-task={resources.gpus_per_task}")
  run = shlex.join([python, "-m", "launch.sweep", f"--run_task={tasks_json}"])
  lines += ["set -eu",
            f'exec {run}:"$SLURM_ARRAY_TASK_ID"', ""]
  return "\n".join(lines)


def _require(tool: str) -> None:
  if shutil.which(tool) is None:
    raise spec.SweepError(f"`{tool}` not found on PATH: run on a SLURM login node, install the "
                     "SLURM client (apt-get install slurm-client) or use --backend=local")


def _slurm(args: Sequence[str]) -> str:
  _require(args[0])
  result = subprocess.run(list(args), capture_output=True, text=True)
  if result.returncode != 0:
    raise spec.SweepError(f"`{shlex.join(args)}` failed (exit {result.returncode}): "
                     f"{result.stderr.strip() or result.stdout.strip()}")
  return result.stdout


def live_jobs(sweep_dir: str | os.PathLike) -> list[str]:
  """Ids of this sweep dir's array jobs that SLURM has not finished."""
  out = _slurm(["squeue", "-h", f"--name={job_name(sweep_dir)}", f"--states={_LIVE_STATES}",
                "-o", "%F"])
  return sorted(set(out.split()))


def in_flight(sweep_dir: str | os.PathLike) -> dict[str, str]:
  """Task name -> array job id for the tasks of still-live submissions of this sweep dir."""
  job_files = sorted(pathlib.Path(sweep_dir, "submit").glob("*/job_id"))
  if not job_files:  # never submitted: no need for squeue (dry runs work without SLURM)
    return {}
  jobs = set(live_jobs(sweep_dir))
  names = {}
  for job_file in job_files:
    job = job_file.read_text().strip()
    if job in jobs:
      for d in json.loads((job_file.parent / "tasks.json").read_text()):
        names[d["name"]] = job
  return names


def _submit_dir(sweep_dir: pathlib.Path) -> pathlib.Path:
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for i in itertools.count():
    path = sweep_dir / "submit" / (stamp if i == 0 else f"{stamp}-{i}")
    try:
      path.mkdir(parents=True)
      return path
    except FileExistsError:
      continue


def submit_slurm(tasks: Sequence[spec.Task], *, sweep_dir: str | os.PathLike,
                 resources: Resources, python: str = sys.executable,
                 dry_run: bool = False) -> tuple[Optional[str], pathlib.Path]:
  """Writes tasks.json and array.sbatch for `tasks`, submits them with sbatch unless dry_run.

  Returns:
    (job id or None for a dry run, the submission folder).
  """
  if not dry_run:
    _require("sbatch")
  sweep_dir = pathlib.Path(sweep_dir).resolve()
  for what, path in (("--sweep_dir", sweep_dir), ("the current folder", os.getcwd())):
    if re.search(r"\s", str(path)):  # #SBATCH lines cannot quote paths
      raise spec.SweepError(f"{what} {str(path)!r} contains whitespace, which #SBATCH "
                            "--output/--chdir cannot hold; use a path without spaces")
  submit_dir = _submit_dir(sweep_dir)
  tasks_json = submit_dir / "tasks.json"
  fileio.atomic_write(tasks_json, json.dumps([t.to_dict() for t in tasks], indent=1))
  script = submit_dir / "array.sbatch"
  fileio.atomic_write(script, array_script(tasks_json=tasks_json, num_tasks=len(tasks),
                                           resources=resources, name=job_name(sweep_dir),
                                           submit_dir=submit_dir, chdir=os.getcwd(),
                                           python=python))
  if dry_run:
    return None, submit_dir
  job_id = _slurm(["sbatch", "--parsable", str(script)]).strip().split(";")[0]
  fileio.atomic_write(submit_dir / "job_id", job_id + "\n")
  return job_id, submit_dir


def wait_for_job(job_id: str, poll_s: float = 5.0) -> None:
  """Returns once SLURM no longer lists any array task of `job_id` as live."""
  while _slurm(["squeue", "-h", f"--jobs={job_id}", f"--states={_LIVE_STATES}",
                "-o", "%i"]).strip():
    time.sleep(poll_s)


def run_array_task(entry: str) -> int:
  """What array task INDEX runs (`python -m launch.sweep --run_task=TASKS_JSON:INDEX`): that
  entry of the submission's tasks.json, with the local backend; returns its exit status."""
  path, _, index = entry.rpartition(":")
  task = spec.Task.from_dict(json.loads(pathlib.Path(path).read_text())[int(index)])
  print(f"task {index}: {task.name}\n  workdir {task.workdir}\n  logs {task.log}.{{out,err}}",
        flush=True)
  code = local.run_task(task)
  print(f"task {index}: {task.name} exited with {code}", flush=True)
  return code
