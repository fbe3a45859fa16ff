"""The local backend: a sweep's tasks as subprocesses on this machine (also what a SLURM array
task runs for its one task).

Each task's stdout and stderr go to `<log>.out` and `<log>.err`, its exit status to `<log>.exit`
(see `launch.spec.Task`).
"""
import concurrent.futures
import pathlib
import subprocess
from typing import Sequence

from launch import spec
from pbas_jax import fileio


def run_task(task: spec.Task) -> int:
  """Runs one task with its stdout/stderr in `<log>.out/.err`, records its exit status."""
  log = pathlib.Path(task.log)
  log.parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(task.log + ".exit").unlink(missing_ok=True)
  with open(task.log + ".out", "wb") as out, open(task.log + ".err", "wb") as err:
    try:
      code = subprocess.run(task.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL).returncode
    except OSError as e:  # e.g. the interpreter does not exist on this node
      err.write(f"launch.sweep: cannot run {task.argv[0]}: {e}\n".encode())
      code = 127
  fileio.atomic_write(task.log + ".exit", f"{code}\n")
  return code


def run_local(tasks: Sequence[spec.Task], parallel: int = 1) -> list[int]:
  """Runs the tasks in `parallel` subprocesses at a time; returns their exit codes in order."""
  if parallel < 1:
    raise spec.SweepError(f"--parallel={parallel}: must be at least 1")
  def run(task):
    code = run_task(task)
    print(f"{task.name}: exit {code}", flush=True)
    return code
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    return list(pool.map(run, tasks))
