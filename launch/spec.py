r"""Sweep specification: what runs, named how, recorded where; no flags, no backend.

A sweep file defines `get_sweep()` returning a list of override dicts, usually built with
`product` (the last axis varies fastest; lists concatenate):

    from launch.spec import product
    def get_sweep():
      return product(classes=["bottle", "screw"], **{"train.num_runs": [3],
                                                     "train.k_values": [(0.25, 0.3)]})

Each dict is one task: one `python -m pbas_jax.main --config=... --workdir=<sweep_dir>/<name>
--config.<key>=<value> ...` run, named from its overrides: `<class>/num_runs3_k_values0.25+0.3`
(`all` when the sweep does not set the class, `default` when it sets nothing else). Vary across
tasks what changes the compiled program (class, backbone, image size, ablation switches) and put
seeds and alphas inside a task (`RUN_KEYS`): its runs then share one compilation and one feature
cache (a `seeds=[...]` or `model.k` axis still works, one process per value). `sweep.json` in the sweep dir
lists every task launched into it; a task is finished when its workdir holds results.json, failed
when its last run's `<log>.exit` is non-zero. `launch.local` and `launch.slurm_backend` run tasks,
`launch.sweep` is the command line, `launch.aggregate` tabulates the results.
"""
import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import re
import sys
from typing import Any, Mapping, Optional, Sequence

from pbas_jax import fileio

CLASS_KEY = "dataset.classes"
SEED_KEY = "train.seed"
# The runs one task trains together on one compiled program (seeds from `train.seed` up, alphas):
# a sweep puts them inside a task and varies across tasks only what changes the program.
RUN_KEYS = ("train.num_runs", "train.k_values")
# Short axis names `product` (and raw sweep dicts) accept for the two keys every sweep uses.
ALIASES = {"classes": CLASS_KEY, "seeds": SEED_KEY}
MAIN_MODULE = "pbas_jax.main"
MANIFEST = "sweep.json"
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]")


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

  def to_dict(self) -> dict:
    """Its JSON form (sweep.json, a submission's tasks.json)."""
    return {**dataclasses.asdict(self), "argv": list(self.argv)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Task":
    return cls(**{**d, "argv": tuple(d["argv"])})


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


def read_manifest(sweep_dir: str | os.PathLike) -> list[Task]:
  """Every task ever launched into `sweep_dir` (its sweep.json), in launch order."""
  path = pathlib.Path(sweep_dir, MANIFEST)
  if not path.exists():
    raise SweepError(f"{path} not found: {sweep_dir} is not a sweep dir "
                     "(python -m launch.sweep writes it)")
  return [Task.from_dict(d) for d in json.loads(path.read_text())["tasks"]]


def update_manifest(sweep_dir: str | os.PathLike, tasks: Sequence[Task]) -> None:
  """Adds `tasks` to sweep.json; a task of the same name replaces the older entry."""
  path = pathlib.Path(sweep_dir, MANIFEST)
  merged = {t.name: t for t in (read_manifest(sweep_dir) if path.exists() else [])}
  merged.update({t.name: t for t in tasks})
  fileio.atomic_write(path, json.dumps({"tasks": [t.to_dict() for t in merged.values()]},
                                       indent=1))


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
