"""Many runs in one program: R independent runs of one class trained together, vmapped.

Runs that share every shape (same class and config; different seeds, or different anomaly degree
`model.k`) train as one: the pure train step is vmapped over a leading run axis of the state, so a
seed table or an alpha curve costs one compilation and one pass of steps over the cached features.
Each step gathers every run's batch from the one copy of the features inside the jitted program
(the features are passed once, the runs' indices per step), so the cache is not copied R times.

Run r is the run alone: its initial parameters, center and data orders come from its own seed (the
caller derives them as for a single run, see `experiment.train_runs`), and its `k` is a traced
value of the step (`train.TRACED_HPARAMS`), not a compiled-in constant.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pbas_jax import sharding
from pbas_jax import train


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a class: the seed of its keys and its anomaly degree (`model.k`)."""
  seed: int
  k: float

  @property
  def name(self) -> str:
    """Its folder inside the class folder when several runs train together."""
    return f"seed{self.seed}_k{self.k:g}"


def runs_of(config: ml_collections.ConfigDict) -> list[Run]:
  """The runs `config` asks for, k-major.

  Every k of `train.k_values` (default `(model.k,)`) with every seed `train.seed ..
  train.seed + train.num_runs - 1`.
  """
  ks = tuple(config.train.get("k_values", ())) or (config.model.k,)
  if len(set(ks)) != len(ks):
    raise ValueError(f"--config.train.k_values={ks} repeats a value; list each k once")
  seeds = range(config.train.seed, config.train.seed + config.train.num_runs)
  return [Run(seed, float(k)) for k in ks for seed in seeds]


def stack(states: list) -> train.TrainState:
  """R states of the same structure -> one state whose leaves have a leading run axis R."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def unstack(states: train.TrainState) -> list:
  """The inverse of `stack`: the R states along the leading run axis."""
  count = jax.tree.leaves(states)[0].shape[0]
  return [jax.tree.map(lambda x, r=r: x[r], states) for r in range(count)]


def hparams_of(runs: list[Run]) -> dict:
  """The per-run traced hyperparameters of the vmapped step: `{'k': (R,)}`."""
  return {"k": jnp.asarray([run.k for run in runs], jnp.float32)}


def make_multirun_step(config: ml_collections.ConfigDict,
                       mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """The train step of R runs at once, jitted, the incoming states donated.

  Returns `step(states, features (N, H, W, D), indices (R, B), keys (R,), hparams) -> (states,
  metrics)`: run r trains on `features[indices[r]]` with key `keys[r]` and `hparams[name][r]`, as
  `train.make_train_step(config)` would alone; metrics have shape (R,). With `mesh`, the states and
  the features are replicated and each run's batch is split over the devices
  (`sharding.batch_layout`: replicated when the device count does not divide B).
  """
  step = jax.vmap(train.make_train_step(config))

  def multi_step(states, features, indices, keys, hparams):
    batches = features[indices]  # (R, B, H, W, D), gathered on device from the one copy
    if mesh is not None:
      batches = jax.lax.with_sharding_constraint(
          batches, sharding.batch_layout(mesh, indices.shape[1], axis=1))
    return step(states, batches, keys, hparams)

  if mesh is None:
    return jax.jit(multi_step, donate_argnums=0)
  rep = sharding.replicated(mesh)
  jitted = jax.jit(multi_step, in_shardings=rep, out_shardings=rep, donate_argnums=0)

  def sharded_step(states, features, indices, keys, hparams):
    return jitted(*sharding.put((states, features, indices, keys, hparams), rep))

  return sharded_step


def train_epoch(step_fn: Callable, states: train.TrainState, features, keys: jax.Array,
                batch_size: int, hparams: dict) -> tuple[train.TrainState, list[dict]]:
  """One epoch of every run, each in its own order, as `train.train_epoch` runs one.

  Args:
    step_fn: `make_multirun_step(config, mesh)`.
    states: stacked states (leading axis R), donated.
    features: `(N, H, W, D)` cached features shared by the runs: on device (each step gathers its
      batches there), or on host (each step's R batches are gathered on the host and sent).
    keys: `(R,)` the runs' epoch keys (what `train.train_epoch` gets for each run alone).
    batch_size: images per step and run.
    hparams: the runs' traced hyperparameters (`hparams_of`).

  Returns:
    The new states and, per run, the epoch's mean metrics as Python floats.
  """
  n = features.shape[0]
  perms, step_keys = jax.vmap(lambda key: train.epoch_plan(key, n, batch_size))(keys)
  perms = np.asarray(perms, np.int32)  # (R, N): one transfer per epoch
  total = None
  for i, start in enumerate(range(0, n, batch_size)):
    indices = perms[:, start:start + batch_size]
    if isinstance(features, jax.Array):
      source = features
    else:  # host cache: send the R batches, gathered here, as the rows to index
      source = features[indices.reshape(-1)]
      indices = np.arange(indices.size, dtype=np.int32).reshape(indices.shape)
    states, metrics = step_fn(states, source, indices, step_keys[:, i], hparams)
    total = metrics if total is None else train.accumulate(total, metrics)
  means = jax.device_get(total)
  steps = step_keys.shape[1]
  return states, [{name: float(v[r]) / steps for name, v in means.items()}
                  for r in range(len(perms))]
