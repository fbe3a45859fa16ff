"""The local backend: a sweep's tasks as subprocesses on this machine (also what a SLURM array
task runs for its one task).

Each task's stdout and stderr go to `<log>.out` and `<log>.err`, its exit status to `<log>.exit`
(see `launch.spec.Task`).

Devices: `parallel` workers run at once, each in a slot with its own environment (`slot_envs`).
With `devices_per_task=n`, slot i sees GPUs `n*i .. n*i+n-1` of the visible ones
(`CUDA_VISIBLE_DEVICES`), so workers never share a GPU. With several workers, JAX's preallocation
(75% of every GPU it sees, taken at start) is turned off (`XLA_PYTHON_CLIENT_PREALLOCATE=false`)
unless the environment already sets it or `XLA_PYTHON_CLIENT_MEM_FRACTION`.
"""
import concurrent.futures
import os
import pathlib
import queue
import shutil
import subprocess
from typing import Mapping, Optional, Sequence

from launch import spec
from pbas_jax import fileio


def run_task(task: spec.Task, env: Optional[Mapping[str, str]] = None) -> int:
  """Runs one task with its stdout/stderr in `<log>.out/.err`, records its exit status.

  Args:
    task: the task.
    env: variables set for it on top of this process's environment (its slot's devices).
  """
  log = pathlib.Path(task.log)
  log.parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(task.log + ".exit").unlink(missing_ok=True)
  with open(task.log + ".out", "wb") as out, open(task.log + ".err", "wb") as err:
    try:
      code = subprocess.run(task.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                            env={**os.environ, **env} if env else None).returncode
    except OSError as e:  # e.g. the interpreter does not exist on this node
      err.write(f"launch.sweep: cannot run {task.argv[0]}: {e}\n".encode())
      code = 127
  fileio.atomic_write(task.log + ".exit", f"{code}\n")
  return code


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
  """The GPUs this process may hand out: `CUDA_VISIBLE_DEVICES` when set, else `nvidia-smi`'s.

  Found without importing JAX (which would claim them). Raises SweepError when neither names any.
  """
  if "CUDA_VISIBLE_DEVICES" in environ:
    gpus = [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
  elif shutil.which("nvidia-smi"):
    result = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                            capture_output=True, text=True)
    gpus = result.stdout.split() if result.returncode == 0 else []
  else:
    gpus = []
  if not gpus:
    raise spec.SweepError("--devices_per_task: no GPU found (CUDA_VISIBLE_DEVICES is empty or "
                          "unset and nvidia-smi lists none); set CUDA_VISIBLE_DEVICES=0,1,... or "
                          "leave --devices_per_task=0")
  return gpus


def slot_envs(parallel: int, devices_per_task: int = 0,
              environ: Mapping[str, str] = os.environ) -> list[dict[str, str]]:
  """The environment variables of each of `parallel` worker slots.

  Args:
    parallel: workers running at once.
    devices_per_task: GPUs of each worker (0: every worker sees what this process sees).
    environ: this process's environment (where the visible GPUs and the user's own memory
      settings are read).

  Returns:
    [{name: value}, ...], one per slot: `CUDA_VISIBLE_DEVICES` (its share of the GPUs) with
    `devices_per_task`, and `XLA_PYTHON_CLIENT_PREALLOCATE=false` with several workers.
  """
  if parallel < 1:
    raise spec.SweepError(f"--parallel={parallel}: must be at least 1")
  if devices_per_task < 0:
    raise spec.SweepError(f"--devices_per_task={devices_per_task}: use 0 (share) or more")
  envs = [{} for _ in range(parallel)]
  if devices_per_task:
    gpus = visible_gpus(environ)
    if parallel * devices_per_task > len(gpus):
      raise spec.SweepError(
          f"--parallel={parallel} x --devices_per_task={devices_per_task} needs "
          f"{parallel * devices_per_task} GPUs, {len(gpus)} are visible ({','.join(gpus)}); "
          f"lower --parallel to {len(gpus) // devices_per_task or 1}"
          + ("" if len(gpus) >= devices_per_task else " and --devices_per_task"))
    for i, env in enumerate(envs):
      env["CUDA_VISIBLE_DEVICES"] = ",".join(
          gpus[i * devices_per_task:(i + 1) * devices_per_task])
  memory_set = {"XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION"} & set(environ)
  if parallel > 1 and not memory_set:
    for env in envs:
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return envs


def run_local(tasks: Sequence[spec.Task], parallel: int = 1, devices_per_task: int = 0
              ) -> list[int]:
  """Runs the tasks in `parallel` subprocesses at a time, each in a slot of its own devices
  (`slot_envs`); returns their exit codes in order."""
  envs = slot_envs(parallel, devices_per_task)
  for i, env in enumerate(envs):
    if env:
      print(f"worker slot {i}: " + " ".join(f"{k}={v}" for k, v in env.items()))
  free = queue.Queue()
  for env in envs:
    free.put(env)

  def run(task):
    env = free.get()  # a slot is free whenever the pool starts a task
    try:
      code = run_task(task, env)
    finally:
      free.put(env)
    print(f"{task.name}: exit {code}", flush=True)
    return code

  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    return list(pool.map(run, tasks))
