r"""Sweeps: many runs of the main job (classes x seeds x hyperparameters) on SLURM or locally.

A sweep file defines `get_sweep()` returning a list of override dicts, usually built with
`product` (the last axis varies fastest; lists concatenate):

    from launch.sweep import product
    def get_sweep():
      return product(classes=["bottle", "screw"], seeds=[0, 1, 2], **{"model.k": [0.25, 0.3]})

Each dict is one task: one `python -m pbas_jax.main --config=... --workdir=<sweep_dir>/<name>
--config.<key>=<value> ...` run, named from its overrides: `<class>/seed<s>_k<v>` (`all` when the
sweep does not set the class, `default` when it sets nothing else). Arguments after `--` go to
every task unchanged (e.g. `-- --config.dataset.root=/data/mvtec`).

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
so re-running the same command submits only what is missing.
"""
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
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
from typing import Any, Mapping, Optional, Sequence

from absl import app
from absl import flags

from pbas_jax import fileio

CLASS_KEY = "dataset.classes"
SEED_KEY = "train.seed"
# Short axis names `product` (and raw sweep dicts) accept for the two keys every sweep uses.
ALIASES = {"classes": CLASS_KEY, "seeds": SEED_KEY}
MAIN_MODULE = "pbas_jax.main"
MANIFEST = "sweep.json"
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]")
# squeue states of a job that may still run a task (anything else has ended).
_LIVE_STATES = "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED,REQUEUED,RESIZING,STOPPED"


class SweepError(ValueError):
  """A sweep file, its tasks or a submission is wrong; the message names the fix."""


def _key(name: str) -> str:
  return ALIASES.get(name, name)


def product(**axes: Sequence[Any]) -> list[dict[str, Any]]:
  """All combinations of the axes' values, one override dict each (the last axis fastest).

  Args:
    **axes: config key (dotted, e.g. `**{"model.k": [...]}`) or alias (`classes`, `seeds`) ->
      list of values.

  Returns:
    [{key: value, ...}, ...] with keys in the order given.
  """
  for name, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
      raise SweepError(f"product({name}=...): give a list of values, e.g. {name}=[{values!r}]")
    if not values:
      raise SweepError(f"product({name}=[]): an empty axis gives no tasks")
  keys = [_key(n) for n in axes]
  return [dict(zip(keys, combo)) for combo in itertools.product(*axes.values())]


def load_sweep(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Runs `get_sweep()` of a sweep file and checks what it returns.

  Returns:
    The override dicts, alias keys replaced by config keys.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise SweepError(f"--sweep={path}: no such file (a Python file defining get_sweep())")
  spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise SweepError(f"sweep file {path} failed to load: {type(e).__name__}: {e}") from e
  if not callable(getattr(module, "get_sweep", None)):
    raise SweepError(f"sweep file {path} defines no get_sweep() function")
  try:
    sweep = module.get_sweep()
  except Exception as e:
    raise SweepError(f"{path}: get_sweep() raised {type(e).__name__}: {e}") from e
  if not isinstance(sweep, list) or not sweep:
    raise SweepError(f"{path}: get_sweep() must return a non-empty list of override dicts "
                     f"(got {type(sweep).__name__})")
  checked = []
  for i, overrides in enumerate(sweep):
    if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
      raise SweepError(f"{path}: task {i} is {overrides!r}, not a dict of config key -> value")
    checked.append({_key(k): v for k, v in overrides.items()})
  return checked


def format_value(value: Any) -> str:
  """An override value as the main job's `--config.<key>=` flag parses it."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def _name_part(value: Any) -> str:
  if isinstance(value, float):
    text = f"{value:g}"
  elif isinstance(value, (list, tuple)):
    text = "+".join(map(str, value))
  else:
    text = str(value).replace(",", "+")
  return _SAFE.sub("-", text) or "empty"


def task_names(sweep: Sequence[Mapping[str, Any]]) -> list[str]:
  """Workdir names `<class>/<key><value>_...`, unique over the sweep.

  A key is shown by its last component (`model.k` -> `k`, `train.seed` -> `seed`) unless two
  keys of the sweep share it; then by the whole key with dots as dashes.
  """
  keys = {k for overrides in sweep for k in overrides} - {CLASS_KEY}
  last = [k.rsplit(".", 1)[-1] for k in keys]
  short = {k: (k.rsplit(".", 1)[-1] if last.count(k.rsplit(".", 1)[-1]) == 1
               else k.replace(".", "-")) for k in keys}
  names, seen = [], {}
  for i, overrides in enumerate(sweep):
    group = _name_part(overrides[CLASS_KEY]) if CLASS_KEY in overrides else "all"
    rest = "_".join(f"{short[k]}{_name_part(v)}" for k, v in overrides.items() if k != CLASS_KEY)
    name = f"{group}/{rest or 'default'}"
    if name in seen:
      raise SweepError(f"sweep tasks {seen[name]} and {i} both get the workdir name {name!r} "
                       f"({dict(sweep[seen[name]])} vs {dict(overrides)}); make them differ")
    seen[name] = i
    names.append(name)
  return names


@dataclasses.dataclass(frozen=True)
class Task:
  """One run of the main job.

  Attributes:
    name: `<class>/<rest>`; the workdir relative to the sweep dir.
    overrides: config key -> value set by the sweep.
    workdir: absolute workdir of the run.
    argv: the command.
    log: absolute path stem of the logs: `<log>.out`, `<log>.err`, `<log>.exit`.
  """
  name: str
  overrides: dict
  workdir: str
  argv: tuple
  log: str

  @property
  def results(self) -> pathlib.Path:
    return pathlib.Path(self.workdir, "results.json")

  def exit_code(self) -> Optional[int]:
    """The exit status of its last run, None when it has not finished a run."""
    path = pathlib.Path(self.log + ".exit")
    return int(path.read_text()) if path.exists() else None


def _config_key(arg: str) -> Optional[str]:
  match = re.match(r"--config\.([\w.]+)=", arg)
  return match.group(1) if match else None


def absolute_config(config: str) -> str:
  """`path.py[:preset]` with an absolute path, so tasks run from any folder."""
  path, sep, preset = config.partition(":")
  if not pathlib.Path(path).is_file():
    raise SweepError(f"--config={config}: file {path} not found (e.g. configs/mvtec.py[:preset])")
  return str(pathlib.Path(path).resolve()) + sep + preset


def make_tasks(sweep: Sequence[Mapping[str, Any]], *, config: str, sweep_dir: str | os.PathLike,
               extra_args: Sequence[str] = (), python: str = sys.executable,
               module: str = MAIN_MODULE) -> list[Task]:
  """The tasks of a sweep.

  Args:
    sweep: override dicts (see `load_sweep`).
    config: `--config` of the main job, `path.py[:preset]`.
    sweep_dir: folder of the whole sweep.
    extra_args: arguments given to every task (before its overrides); they must not set a key the
      sweep sets.
    python: interpreter that runs the main job.
    module: the main job's module.
  """
  for arg in extra_args:
    if not arg.startswith("--"):
      raise SweepError(f"argument {arg!r} for every task must be a flag (--config.key=value)")
  swept = {k for overrides in sweep for k in overrides}
  clash = sorted({_config_key(a) for a in extra_args} & swept)
  if clash:
    raise SweepError(f"{', '.join(clash)} is set both by the sweep and after `--`; drop one")
  sweep_dir = pathlib.Path(sweep_dir).resolve()
  config = absolute_config(config)
  tasks = []
  for name, overrides in zip(task_names(sweep), sweep):
    workdir = sweep_dir / name
    argv = (python, "-m", module, f"--config={config}", f"--workdir={workdir}", *extra_args,
            *(f"--config.{k}={format_value(v)}" for k, v in overrides.items()))
    tasks.append(Task(name=name, overrides=dict(overrides), workdir=str(workdir), argv=argv,
                      log=str(sweep_dir / "logs" / name)))
  return tasks


def _task_dict(task: Task) -> dict:
  return {**dataclasses.asdict(task), "argv": list(task.argv)}


def _task_from(d: Mapping[str, Any]) -> Task:
  return Task(**{**d, "argv": tuple(d["argv"])})


def read_manifest(sweep_dir: str | os.PathLike) -> list[Task]:
  """Every task ever launched into `sweep_dir` (its sweep.json), in launch order."""
  path = pathlib.Path(sweep_dir, MANIFEST)
  if not path.exists():
    raise SweepError(f"{path} not found: {sweep_dir} is not a sweep dir "
                     "(python -m launch.sweep writes it)")
  return [_task_from(d) for d in json.loads(path.read_text())["tasks"]]


def update_manifest(sweep_dir: str | os.PathLike, tasks: Sequence[Task]) -> None:
  """Adds `tasks` to sweep.json; a task of the same name replaces the older entry."""
  path = pathlib.Path(sweep_dir, MANIFEST)
  merged = {t.name: t for t in (read_manifest(sweep_dir) if path.exists() else [])}
  merged.update({t.name: t for t in tasks})
  fileio.atomic_write(path, json.dumps({"tasks": [_task_dict(t) for t in merged.values()]}, indent=1))


def run_task(task: Task) -> int:
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


def run_local(tasks: Sequence[Task], parallel: int = 1) -> list[int]:
  """Runs the tasks in `parallel` subprocesses at a time; returns their exit codes in order."""
  if parallel < 1:
    raise SweepError(f"--parallel={parallel}: must be at least 1")
  def run(task):
    code = run_task(task)
    print(f"{task.name}: exit {code}", flush=True)
    return code
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    return list(pool.map(run, tasks))


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
    raise SweepError("a job array needs at least one task")
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
    raise SweepError(f"`{tool}` not found on PATH: run on a SLURM login node, install the "
                     "SLURM client (apt-get install slurm-client) or use --backend=local")


def _slurm(args: Sequence[str]) -> str:
  _require(args[0])
  result = subprocess.run(list(args), capture_output=True, text=True)
  if result.returncode != 0:
    raise SweepError(f"`{shlex.join(args)}` failed (exit {result.returncode}): "
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


def submit_slurm(tasks: Sequence[Task], *, sweep_dir: str | os.PathLike, resources: Resources,
                 python: str = sys.executable, dry_run: bool = False) -> tuple[Optional[str], pathlib.Path]:
  """Writes tasks.json and array.sbatch for `tasks`, submits them with sbatch unless dry_run.

  Returns:
    (job id or None for a dry run, the submission folder).
  """
  if not dry_run:
    _require("sbatch")
  sweep_dir = pathlib.Path(sweep_dir).resolve()
  for what, path in (("--sweep_dir", sweep_dir), ("the current folder", os.getcwd())):
    if re.search(r"\s", str(path)):  # #SBATCH lines cannot quote paths
      raise SweepError(f"{what} {str(path)!r} contains whitespace, which #SBATCH --output/--chdir "
                       "cannot hold; use a path without spaces")
  submit_dir = _submit_dir(sweep_dir)
  tasks_json = submit_dir / "tasks.json"
  fileio.atomic_write(tasks_json, json.dumps([_task_dict(t) for t in tasks], indent=1))
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
  while _slurm(["squeue", "-h", f"--jobs={job_id}", f"--states={_LIVE_STATES}", "-o", "%i"]).strip():
    time.sleep(poll_s)


def _tail(path: str, lines: int = 5) -> list[str]:
  p = pathlib.Path(path)
  return p.read_text(errors="replace").splitlines()[-lines:] if p.exists() else []


def status_report(tasks: Sequence[Task]) -> tuple[str, int]:
  """A summary of the tasks' state, and how many are not finished.

  A task is finished when its results.json exists, failed when its last run exited non-zero;
  for every failed or unfinished task the report names its logs (and shows the end of stderr).
  """
  lines, failed, missing = [], 0, 0
  for task in tasks:
    if task.results.exists():
      continue
    code = task.exit_code()
    if code is None:
      missing += 1
      lines.append(f"  {task.name}: no results.json and no exit status (not run, running, or "
                   f"killed: see {task.log}.err and the slurm-*.err of its submission)")
    else:
      failed += 1
      lines.append(f"  {task.name}: FAILED with exit {code}; log {task.log}.err"
                   + ("" if code else " (exit 0 but no results.json)"))
      lines += [f"    | {line}" for line in _tail(task.log + ".err")]
  done = len(tasks) - failed - missing
  head = f"{done} of {len(tasks)} tasks finished, {failed} failed, {missing} without a result"
  return "\n".join([head, *lines]), failed + missing


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command line flags; defined only when run as a program, so that sweep files can import
  this module (as `launch.sweep`) while it runs as `__main__`."""
  return {
      "config": flags.DEFINE_string("config", None, "Main job config, configs/<x>.py[:preset]."),
      "sweep": flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep()."),
      "sweep_dir": flags.DEFINE_string("sweep_dir", None, "Folder of the workdirs and logs."),
      "backend": flags.DEFINE_enum("backend", "slurm", ["slurm", "local"],
                                   "slurm: one sbatch job array; local: subprocesses here."),
      "parallel": flags.DEFINE_integer("parallel", 1, "local: tasks run at once."),
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


def _run_one(spec: str) -> int:
  path, _, index = spec.rpartition(":")
  task = _task_from(json.loads(pathlib.Path(path).read_text())[int(index)])
  print(f"task {index}: {task.name}\n  workdir {task.workdir}\n  logs {task.log}.{{out,err}}",
        flush=True)
  code = run_task(task)
  print(f"task {index}: {task.name} exited with {code}", flush=True)
  return code


def launch(sweep_file: str, *, config: str, sweep_dir: str, backend: str,
           extra_args: Sequence[str] = (), parallel: int = 1, resources: Resources = Resources(),
           python: str = sys.executable, dry_run: bool = False, wait: bool = False,
           module: str = MAIN_MODULE) -> int:
  """Launches the missing tasks of a sweep; returns a process exit code (0: nothing failed).

  With the local backend the tasks run before it returns; with SLURM they are submitted as one
  job array (and waited for with `wait`). Failed or unfinished tasks are listed with their logs.
  """
  tasks = make_tasks(load_sweep(sweep_file), config=config, sweep_dir=sweep_dir,
                     extra_args=extra_args, python=python, module=module)
  done = [t for t in tasks if t.results.exists()]
  busy = in_flight(sweep_dir) if backend == "slurm" else {}
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
    update_manifest(sweep_dir, tasks)
  if backend == "local":
    if dry_run:
      return 0
    run_local(todo, parallel)
  else:
    job_id, submit_dir = submit_slurm(todo, sweep_dir=sweep_dir, resources=resources,
                                      python=python, dry_run=dry_run)
    if job_id is None:
      print(f"dry run: wrote {submit_dir / 'array.sbatch'} (not submitted)")
      return 0
    print(f"submitted job array {job_id} ({len(todo)} tasks): {submit_dir / 'array.sbatch'}\n"
          f"  task logs {pathlib.Path(sweep_dir).resolve() / 'logs'}/<name>.{{out,err}}")
    if not wait:
      return 0
    wait_for_job(job_id)
  report, unfinished = status_report(todo)
  print(report)
  return 1 if unfinished else 0


def main(argv, f: dict[str, flags.FlagHolder]):
  if f["run_task"].value:
    sys.exit(_run_one(f["run_task"].value))
  missing = [f"--{name}" for name in ("config", "sweep", "sweep_dir") if not f[name].value]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)}")
  resources = Resources(**{k: f[k].value for k in ("partition", "time", "cpus_per_task", "mem",
                                                   "gpus_per_task", "array_limit")})
  try:
    code = launch(f["sweep"].value, config=f["config"].value, sweep_dir=f["sweep_dir"].value,
                  backend=f["backend"].value, extra_args=argv[1:], parallel=f["parallel"].value,
                  resources=resources, python=f["python"].value, dry_run=f["dry_run"].value,
                  wait=f["wait"].value)
  except SweepError as e:
    sys.exit(f"launch.sweep: error: {e}")
  sys.exit(code)


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
