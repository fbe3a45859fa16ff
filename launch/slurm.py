"""A private single-node SLURM cluster (munged, slurmctld, slurmd) for tests and trying sweeps.

Needs the Debian packages `slurm-wlm` and `munge` and root (the daemons run as root; there is no
systemd). Everything the cluster writes lives under `state_dir`: slurm.conf, the munge key and
socket, controller state, slurmd spool, logs and the daemons' pids. Ports are picked free so the
cluster does not clash with another one on the machine. Client commands (`sbatch`, `squeue`,
`sinfo`, ...) reach it through `SLURM_CONF=<state_dir>/slurm.conf`.

    python -m launch.slurm start --state_dir=/tmp/slurm   # prints the export line
    python -m launch.slurm stop --state_dir=/tmp/slurm
"""
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Mapping

from absl import app
from absl import flags

from pbas_jax import fileio

# Executables the cluster needs; one missing means the packages are not installed.
REQUIRED_EXECUTABLES = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "scancel", "sbatch")
_INSTALL_HINT = "install them with `apt-get install -y slurm-wlm munge`"
# The munge socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 100
# Daemons started by this process, by pid (stopping them from here also reaps them).
_CHILDREN: dict[int, subprocess.Popen] = {}


class ClusterError(RuntimeError):
  """The local cluster could not be started or stopped."""


@dataclasses.dataclass(frozen=True)
class LocalCluster:
  """A started cluster: `env` is os.environ plus SLURM_CONF, for running client commands."""
  state_dir: pathlib.Path
  conf: pathlib.Path
  env: Mapping[str, str]


def missing_executables() -> list[str]:
  """Names in REQUIRED_EXECUTABLES that are not on PATH (sbin included)."""
  path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
  return [name for name in REQUIRED_EXECUTABLES if shutil.which(name, path=path) is None]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _node_hardware() -> str:
  """`slurmd -C`'s description of this machine (CPUs, sockets, cores, threads, RealMemory).

  Declaring the node with exactly what slurmd detects keeps it from being drained as invalid.
  """
  out = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True).stdout
  line = out.splitlines()[0]
  fields = [f for f in line.split() if not f.startswith("NodeName=")]
  if not any(f.startswith("CPUs=") for f in fields):
    raise ClusterError(f"unexpected `slurmd -C` output: {out!r}")
  return " ".join(fields)


def _cpus_and_memory(hardware: str) -> tuple[int, int]:
  cpus = int(re.search(r"\bCPUs=(\d+)", hardware).group(1))
  memory = int(re.search(r"\bRealMemory=(\d+)", hardware).group(1))
  return cpus, memory


def slurm_conf(state_dir: pathlib.Path, hardware: str, ctld_port: int, slurmd_port: int) -> str:
  """The text of a minimal slurm.conf: one node `localhost`, one default partition `local`.

  proctrack/linuxproc and task/none need no cgroups (containers often have none writable);
  CR_CPU_Memory makes `--cpus-per-task` and `--mem` real limits for packing array tasks.
  """
  cpus, memory = _cpus_and_memory(hardware)
  return "\n".join([
      "ClusterName=pbaslocal",
      "SlurmctldHost=localhost",
      f"SlurmctldPort={ctld_port}",
      f"SlurmdPort={slurmd_port}",
      "SlurmUser=root",
      "SlurmdUser=root",
      "AuthType=auth/munge",
      "CredType=cred/munge",
      f"AuthInfo=socket={state_dir / 'munge' / 'munge.socket'}",
      f"StateSaveLocation={state_dir / 'ctld'}",
      f"SlurmdSpoolDir={state_dir / 'spool'}",
      f"SlurmctldPidFile={state_dir / 'slurmctld.pid'}",
      f"SlurmdPidFile={state_dir / 'slurmd.pid'}",
      f"SlurmctldLogFile={state_dir / 'log' / 'slurmctld.log'}",
      f"SlurmdLogFile={state_dir / 'log' / 'slurmd.log'}",
      "ProctrackType=proctrack/linuxproc",
      "TaskPlugin=task/none",
      "JobAcctGatherType=jobacct_gather/none",
      "AccountingStorageType=accounting_storage/none",
      "JobCompType=jobcomp/none",
      "MpiDefault=none",
      "SchedulerType=sched/backfill",
      "SelectType=select/cons_tres",
      "SelectTypeParameters=CR_CPU_Memory",
      f"DefMemPerCPU={max(1, memory // cpus)}",
      "ReturnToService=2",
      "SlurmctldTimeout=30",
      "SlurmdTimeout=30",
      "InactiveLimit=0",
      "KillWait=5",
      f"NodeName=localhost NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
      "PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
      "",
  ])


def _pids_file(state_dir: pathlib.Path) -> pathlib.Path:
  return state_dir / "pids.json"


def _log_tails(state_dir: pathlib.Path, lines: int = 15) -> str:
  parts = []
  for log in sorted((state_dir / "log").glob("*.log")):
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    parts.append(f"--- {log} (last {len(tail)} lines)\n" + "\n".join(tail))
  return "\n".join(parts)


def _node_state(env: Mapping[str, str]) -> str:
  result = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=dict(env),
                          capture_output=True, text=True)
  return result.stdout.strip() if result.returncode == 0 else ""


def start_local_cluster(state_dir, *, timeout_s: float = 60.0) -> LocalCluster:
  """Starts munged, slurmctld and slurmd for a one-node cluster, waits until the node is idle.

  Args:
    state_dir: folder for everything the cluster writes (created; should be private to it).
    timeout_s: how long to wait for `sinfo` to report the node idle.

  Returns:
    The cluster; pass `cluster.env` to client commands (or export SLURM_CONF=cluster.conf).

  Raises:
    ClusterError: packages missing, not root, or the node did not come up (the daemons that
      were started are stopped again; the message holds the tails of their logs).
  """
  missing = missing_executables()
  if missing:
    raise ClusterError(f"SLURM/munge executables not found: {', '.join(missing)}; {_INSTALL_HINT}")
  if os.geteuid() != 0:
    raise ClusterError("the local cluster runs its daemons as root (SlurmUser=root); run as root")
  state_dir = pathlib.Path(state_dir).resolve()
  munge_dir = state_dir / "munge"
  munge_socket = munge_dir / "munge.socket"
  if len(str(munge_socket)) > _MAX_SOCKET_PATH:
    raise ClusterError(f"state_dir {state_dir} is too long for a unix socket path "
                       f"(> {_MAX_SOCKET_PATH} characters with /munge/munge.socket); use a shorter one")
  if _pids_file(state_dir).exists():
    raise ClusterError(f"a cluster is already recorded in {state_dir} (pids.json); "
                       "stop it first with `python -m launch.slurm stop --state_dir=...`")
  for sub in ("munge", "ctld", "spool", "log"):
    (state_dir / sub).mkdir(parents=True, exist_ok=True)
  munge_dir.chmod(0o700)

  conf = state_dir / "slurm.conf"
  fileio.atomic_write(conf, slurm_conf(state_dir, _node_hardware(), _free_port(), _free_port()))
  conf.chmod(0o644)  # client commands of any user read it
  key = munge_dir / "munge.key"
  if not key.exists():
    fileio.atomic_write(key, os.urandom(1024))
    key.chmod(0o600)  # munged refuses a key that others can read
  env = {**os.environ, "SLURM_CONF": str(conf)}

  # Foreground daemons in their own sessions: this process owns them and records their pids.
  commands = {
      "munged": ["munged", "--foreground", "--force", f"--key-file={key}",
                 f"--socket={munge_socket}", f"--pid-file={munge_dir / 'munged.pid'}",
                 f"--seed-file={munge_dir / 'munged.seed'}",
                 f"--log-file={state_dir / 'log' / 'munged.log'}"],
      "slurmctld": ["slurmctld", "-D", "-i", "-f", str(conf)],
      "slurmd": ["slurmd", "-D", "-N", "localhost", "-f", str(conf)],
  }
  pids = {}
  try:
    for name, command in commands.items():
      with open(state_dir / "log" / f"{name}.stderr.log", "ab") as log:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
      pids[name] = proc.pid
      _CHILDREN[proc.pid] = proc
      fileio.atomic_write(_pids_file(state_dir), json.dumps(pids))
      if name == "munged":
        _wait_for(lambda: munge_socket.exists(), timeout_s, "munged to create its socket",
                  state_dir, pids)
    _wait_for(lambda: _node_state(env) == "idle", timeout_s, "sinfo to show the node idle",
              state_dir, pids)
  except BaseException:
    stop_local_cluster(state_dir)
    raise
  return LocalCluster(state_dir=state_dir, conf=conf, env=env)


def _alive(pid: int, name: str) -> bool:
  """Whether daemon `name` still runs as `pid`."""
  proc = _CHILDREN.get(pid)
  if proc is not None:  # started by this process: poll() also reaps it
    return proc.poll() is None
  # Recorded by another process (the CLI): check the pid was not reused by something else.
  try:
    return name in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
  except OSError:
    return False


def _wait_for(condition, timeout_s, what, state_dir, pids) -> None:
  deadline = time.monotonic() + timeout_s
  while not condition():
    dead = [name for name, pid in pids.items() if not _alive(pid, name)]
    if dead or time.monotonic() > deadline:
      why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout_s:.0f} s"
      raise ClusterError(f"waiting for {what}: {why}\n{_log_tails(state_dir)}")
    time.sleep(0.3)


def stop_local_cluster(state_dir, *, timeout_s: float = 20.0) -> None:
  """Cancels the cluster's jobs and stops the daemons recorded in `state_dir` (no-op if none).

  Only the pids this module recorded are signalled (SIGTERM, then SIGKILL after `timeout_s`).
  """
  state_dir = pathlib.Path(state_dir).resolve()
  pids_file = _pids_file(state_dir)
  if not pids_file.exists():
    return
  pids = json.loads(pids_file.read_text())
  env = {**os.environ, "SLURM_CONF": str(state_dir / "slurm.conf")}
  if "slurmctld" in pids and _alive(pids["slurmctld"], "slurmctld"):
    # Jobs first, so no job step outlives slurmd.
    subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=env,
                   capture_output=True, timeout=30)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True,
                             text=True, timeout=30)
      if queue.returncode != 0 or not queue.stdout.strip():
        break
      time.sleep(0.5)
  for name in ("slurmd", "slurmctld", "munged"):
    pid = pids.get(name)
    if pid is None or not _alive(pid, name):
      continue
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid, name) and time.monotonic() < deadline:
      time.sleep(0.1)
    if _alive(pid, name):
      os.kill(pid, signal.SIGKILL)
      while _alive(pid, name):
        time.sleep(0.1)
    _CHILDREN.pop(pid, None)
  pids_file.unlink()


_STATE_DIR = flags.DEFINE_string("state_dir", None, "Folder of the local cluster.", required=True)


def main(argv):
  if len(argv) != 2 or argv[1] not in ("start", "stop"):
    raise app.UsageError("usage: python -m launch.slurm start|stop --state_dir=DIR")
  if argv[1] == "start":
    cluster = start_local_cluster(_STATE_DIR.value)
    print(f"cluster up; for client commands run:\nexport SLURM_CONF={cluster.conf}")
  else:
    stop_local_cluster(_STATE_DIR.value)
    print("cluster stopped")


if __name__ == "__main__":
  app.run(main)
