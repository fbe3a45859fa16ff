"""Checkpoints of the train state: the only module that imports orbax.

A class directory holds `checkpoints/<epoch>/` (the state during training, every
`train.checkpoint_every` epochs and at the end) and `model/` (the state whose results are reported:
the last epoch, or the test-selected one under `eval.selection='test_oracle'`). Orbax writes each
step to a temporary directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint intact and the half-written one is ignored on restore.

A rerun after a crash saves again what the crashed run saved (training and evaluation are
deterministic), so `Checkpointer.save` keeps an epoch already saved with the same meta, and
`Checkpointer.keep` removes the epochs a folder should no longer hold (`model/` and `best/` keep
theirs explicitly rather than by orbax's `max_to_keep`, which keeps the highest epochs).
"""
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

# Settings that may change between a run and its resumption without invalidating its checkpoints:
# where things live, how long to train and how to evaluate.
# train.mesh: where the runs train, not what they compute (every layout trains the same numbers
# to float rounding), so a run may resume on another device count.
_RESUMABLE_KEYS = ("dataset.root", "dataset.data_dir", "dataset.classes", "backbone.cache_dir",
                   "train.epochs", "train.checkpoint_every", "train.feature_cache", "train.mesh",
                   "eval")


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short hash of the settings that determine the training trajectory."""
  flat = json.loads(config.to_json_best_effort())
  for key in _RESUMABLE_KEYS:
    node = flat
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  blob = json.dumps(flat, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


class ConfigMismatchError(RuntimeError):
  pass


class Checkpointer:
  """Saves and restores `(state, meta)` pairs by epoch; `meta` is a JSON-able dict.

  `max_to_keep`: the number of highest epochs kept after a save; None keeps every epoch (then
  `keep` says which).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_epoch(self) -> int | None:
    return self._manager.latest_step()

  def epochs(self) -> list[int]:
    """The saved epochs, in increasing order."""
    return sorted(self._manager.all_steps())

  def save(self, epoch: int, state: Any, meta: dict) -> None:
    """Saves `state` and `meta` as `epoch`.

    An `epoch` saved before with the same `meta` (a rerun after a crash) is kept as it is; one
    saved with another meta is replaced.
    """
    if epoch in self._manager.all_steps():
      if self.meta(epoch) == json.loads(json.dumps(meta)):
        logging.info("%s: epoch %d is saved already; kept", self.directory, epoch)
        return
      logging.info("%s: replacing epoch %d, saved with other meta", self.directory, epoch)
      self._manager.delete(epoch)
    self._manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore(self, template: Any, epoch: int | None = None) -> tuple[Any, dict]:
    """Restores the state at `epoch` (default: latest) into the structure of `template`."""
    epoch = self.latest_epoch() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    out = self._manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def meta(self, epoch: int | None = None) -> dict | None:
    """The meta dict saved with `epoch` (default: latest), without reading the state; None if none."""
    epoch = self.latest_epoch() if epoch is None else epoch
    if epoch is None:
      return None
    return self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def keep(self, epochs: Iterable[int | None]) -> None:
    """Deletes every saved epoch not in `epochs` (None entries are ignored)."""
    for epoch in sorted(set(self._manager.all_steps()) - set(epochs)):
      self._manager.delete(epoch)

  def close(self) -> None:
    self._manager.close()


def check_compatible(meta: dict, expected_hash: str, directory: str) -> None:
  """Refuses to resume from checkpoints written under a different training configuration."""
  found = meta.get("config_hash")
  if found != expected_hash:
    raise ConfigMismatchError(
        f"{directory} holds checkpoints of a different configuration (hash {found}, now "
        f"{expected_hash}). Use a new --workdir, or delete that directory to start over.")
