"""Per-epoch curves of a class: `metrics.jsonl` and TensorBoard event files (tensorboardX).

`EpochLog` is what training writes to: one JSON line per epoch and run in `<class dir>/metrics.jsonl`
and the same scalars as TensorBoard curves in each run's folder (`train/<metric>`,
`test/<metric>`). Only process 0 writes.

tensorboardX writes TensorBoard's event-file format with protobuf and numpy only (neither
TensorFlow nor torch). A class's curves go to `<class dir>/tensorboard/`, so
`tensorboard --logdir <workdir>` shows one run per class. Only process 0 writes; on the other
processes of a multi-host job a writer does nothing. Writes are synchronous (tensorboardX's
`EventsWriter`, not its queue-and-thread `SummaryWriter`, whose flush leaves queued points
unwritten): after `flush()` every point written so far is in the file.

Resumed runs: a writer always starts a new event file in the directory, opened with `first_step`,
the first step it will write (0 for a fresh run, the first epoch not covered by the restored
checkpoint on a resume). The file starts with a restart marker at that step (a SessionLog START
event, what tensorboardX's and torch's `purge_step` write). TensorBoard then shows the new points
in place of the old ones: a tag's points at steps >= `first_step` from earlier files (the epochs an
interrupted run logged after its last checkpoint, or the curves of an earlier run in a reused
workdir) are dropped. Its default loader (the Rust data server) drops them per tag, once the new
run writes that tag again at an earlier step; the Python loader (`--load_fast=false`) drops all
tags' at the marker. Either way the older files keep those points on disk.
"""
import json
import os
import sys
import time
from typing import Mapping, Optional

import jax
import numpy as np

from pbas_jax import fileio

TENSORBOARD_DIR = "tensorboard"  # under the class directory


def _tensorboardx():
  """The tensorboardX modules used here, imported without torch."""
  # tensorboardX imports torch when it is installed only to accept torch tensors: 8 s and 0.9 GB
  # of memory here, and on a GPU machine torch's CUDA libraries would load next to JAX's. A None
  # entry in sys.modules makes that optional import fail as if torch were absent.
  hide_torch = "tensorboardX" not in sys.modules and "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None
  try:
    # pylint: disable=g-import-not-at-top
    from tensorboardX import event_file_writer
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto import summary_pb2
  finally:
    if hide_torch:
      del sys.modules["torch"]
  return event_file_writer, event_pb2, summary_pb2


def _as_float(value) -> Optional[float]:
  """A number (Python, numpy or a one-element array) as float; None for anything else."""
  if value is None:
    return None
  array = np.asarray(value)
  if array.dtype.kind not in "biuf" or array.size != 1:
    return None
  return float(array.reshape(()))


class ScalarWriter:
  """Appends scalars (one point per tag and step) to a new event file in `directory`.

  `first_step`: the smallest step this writer will write; TensorBoard drops the points at steps
  >= `first_step` from the directory's earlier event files (see the module docstring).
  """

  def __init__(self, directory: str, first_step: int):
    self.directory = directory
    self._writer = None
    self._closed = False
    if jax.process_index() != 0:
      return
    os.makedirs(directory, exist_ok=True)
    event_file_writer, self._event_pb2, self._summary_pb2 = _tensorboardx()
    # tensorboardX names files by the second; the suffix keeps two writers in the same second
    # apart, in creation order (TensorBoard reads a directory's files sorted by name).
    self._writer = event_file_writer.EventsWriter(os.path.join(directory, "events"),
                                                  f".{time.time_ns()}")
    self._writer.write_event(self._event_pb2.Event(
        wall_time=time.time(), step=int(first_step),
        session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))

  def write(self, step: int, scalars: Mapping[str, object]) -> None:
    """Adds `scalars` at `step`; None and non-numeric values (strings, arrays) are skipped."""
    if self._closed:
      raise RuntimeError(f"curves: the writer on {self.directory} is closed")
    if self._writer is None:
      return
    summary = self._summary_pb2.Summary()
    for tag, value in scalars.items():
      number = _as_float(value)
      if number is not None:
        summary.value.add(tag=str(tag), simple_value=number)
    if summary.value:
      self._writer.write_event(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                                     summary=summary))

  def flush(self) -> None:
    """Writes the buffered points to disk."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file; closing again does nothing."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    self._closed = True

  def __enter__(self) -> "ScalarWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_writer(class_dir: str, first_step: int = 0) -> ScalarWriter:
  """A `ScalarWriter` on `<class_dir>/tensorboard` whose first point is at `first_step`."""
  return ScalarWriter(os.path.join(class_dir, TENSORBOARD_DIR), first_step)


def _scalars(record: Mapping[str, object]) -> dict:
  """TensorBoard tags of a `metrics.jsonl` record: `train/<metric>`, `test/<metric>`."""
  return {(f"test/{key[5:]}" if key.startswith("test_") else f"train/{key}"): value
          for key, value in record.items() if key not in ("epoch", "run", "seed", "alpha")}


def log_evaluation(class_dir: str, run_dirs: list[str], records: list[Mapping]) -> None:
  """Adds the reported evaluation of each run to the class's curves, where training did not log it
  (`eval.every_epochs=0`, or an epoch between evaluations).

  `records`: per run `epoch`, `run`, `seed`, `alpha` and `test_<metric>`. Each is merged into the
  line of its epoch and run in `metrics.jsonl` (appended when there is none) unless that line
  holds test metrics already (evaluated in training, or an earlier call: a rerun or `eval.only`
  adds nothing); the merged line's scalars go to the run's TensorBoard curves at that epoch.
  """
  if jax.process_index() != 0:
    return
  path = os.path.join(class_dir, "metrics.jsonl")
  lines = []
  if os.path.exists(path):
    with open(path) as f:
      lines = [json.loads(line) for line in f if line.strip()]
  by_key = {(line["epoch"], line["run"]): line for line in lines}
  merged = []
  for record in records:
    line = by_key.get((record["epoch"], record["run"]))
    if line is None:
      line = {}
      lines.append(line)
    elif any(key.startswith("test_") for key in line):
      continue
    line.update(record)
    merged.append(line)
  if not merged:
    return
  fileio.atomic_write(path, "".join(json.dumps(line) + "\n" for line in lines))
  for line in merged:
    # Opened at the epoch: the restart marker replaces that epoch's points with this full line.
    with open_writer(run_dirs[line["run"]], first_step=line["epoch"]) as writer:
      writer.write(line["epoch"], _scalars(line))


class EpochLog:
  """The per-epoch record of a class's runs: `metrics.jsonl` plus TensorBoard curves per run.

  On a resume from `resume_epoch`, lines past it are dropped from `metrics.jsonl` (the epochs an
  interrupted run logged after its last checkpoint) and the curves restart at `resume_epoch + 1`.
  """

  def __init__(self, class_dir: str, run_dirs: list[str], resume_epoch: int):
    self._file = None
    self._writers = [open_writer(d, first_step=resume_epoch + 1) for d in run_dirs]
    if jax.process_index() != 0:
      return
    path = os.path.join(class_dir, "metrics.jsonl")
    kept = []
    if resume_epoch and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["epoch"] <= resume_epoch]
    fileio.atomic_write(path, "".join(kept))
    self._file = open(path, "a")

  def write(self, run: int, record: Mapping[str, object]) -> None:
    """Logs run `run`'s `record` (`epoch`, training metrics, `test_<metric>` when evaluated)."""
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    self._writers[run].write(record["epoch"], _scalars(record))
    self._writers[run].flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    for writer in self._writers:
      writer.close()
