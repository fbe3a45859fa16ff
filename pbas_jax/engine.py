"""The training engine: R runs of a class, an epoch (or several) per compiled call, on a mesh.

Every training goes through here; a single run is R = 1. The train state carries a leading run
axis R; the runs share one copy of the cached features and differ in their seed (initial heads,
center order, data orders) and anomaly degree `k` (a traced value of the step, so seeds x alpha
values share one compilation). Run r trains exactly as it would alone.

One call of `Trainer.train` is one jitted program over `num_epochs` epochs: each epoch's order and
per-step keys are derived on device from the run's key and the epoch number (`epoch_plan`), the
full batches run inside `jax.lax.scan`, the last partial batch is one more step of its own size (as
the reference's loader keeps it: BatchNorm statistics are those of that batch), metrics are summed
on device and fetched once per call, and the state is donated. The step is the pure
`train.make_train_step`, vmapped over the run axis.

Sharding (`sharding.py`): one strategy for every path. The state, features and keys are
replicated over the mesh; each gathered batch `(R, B, H, W, D)` is split over the `data` axis
along B, or replicated when the device count does not divide B, so batch statistics are always
those of the whole batch. One device is a one-device mesh.
"""
import dataclasses
import functools
import time
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pbas_jax import center as center_lib
from pbas_jax import sharding
from pbas_jax import train


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a class: the seed of its keys and its anomaly degree alpha (`model.k`)."""
  seed: int
  k: float

  @property
  def name(self) -> str:
    """Its folder inside the class folder when several runs train together."""
    return f"seed{self.seed}_k{self.k:g}"


def runs_of(config: ml_collections.ConfigDict) -> list[Run]:
  """The runs `config` asks for, alpha-major: every k of `train.k_values` (default
  `(model.k,)`) with every seed `train.seed .. train.seed + train.num_runs - 1`."""
  ks = tuple(config.train.k_values) or (config.model.k,)
  if len(set(ks)) != len(ks):
    raise ValueError(f"--config.train.k_values={ks} repeats a value; list each k once")
  seeds = range(config.train.seed, config.train.seed + config.train.num_runs)
  return [Run(seed, float(k)) for k in ks for seed in seeds]


def stack(states: list) -> train.TrainState:
  """R states of the same structure -> one state whose leaves have a leading run axis R."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def unstack(states: train.TrainState) -> list[train.TrainState]:
  """The inverse of `stack`: the R states along the leading run axis."""
  count = jax.tree.leaves(states)[0].shape[0]
  return [jax.tree.map(lambda x, r=r: x[r], states) for r in range(count)]


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The keys of the run with `seed`: heads' initial parameters, center order, training orders."""
  k_init, k_center, k_train = jax.random.split(jax.random.key(seed), 3)
  return k_init, k_center, k_train


def _stacked_keys(runs: list[Run], which: int) -> jax.Array:
  return jnp.stack([run_keys(run.seed)[which] for run in runs])


def hparams_of(runs: list[Run]) -> dict:
  """The per-run traced hyperparameters of the vmapped step: `{'k': (R,)}`."""
  return {"k": jnp.asarray([run.k for run in runs], jnp.float32)}


def epoch_plan(key: jax.Array, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """An epoch's image order `(n,)` and its per-step keys `(ceil(n / batch_size),)` from `key`.

  Step i trains on `perm[i * batch_size:(i + 1) * batch_size]` (the last batch may be partial).
  """
  if batch_size < 1:
    raise ValueError(f"dataset.batch_size={batch_size}: must be >= 1")
  key_perm, key_steps = jax.random.split(key)
  return jax.random.permutation(key_perm, n), jax.random.split(key_steps, -(-n // batch_size))


def _new_state(config: ml_collections.ConfigDict, k_init: jax.Array, k_center: jax.Array,
               features: jax.Array) -> train.TrainState:
  """A run's starting state: heads drawn from `k_init`, the ABL center over the features in the
  order drawn from `k_center` (the initial projector's parameters are traced, not constants)."""
  state = train.create_train_state(config, k_init, features.shape[-1])
  project = functools.partial(state.projector.apply, {"params": state.params["projector"]})
  center = center_lib.init_center(
      project, features, jax.random.permutation(k_center, features.shape[0]),
      config.dataset.batch_size, config.model.center_init, config.model.center_metric,
      config.model.center_ema, key=k_center, kmeans_iters=config.model.kmeans_iters)
  return state.replace(center=center)


def init_states(config: ml_collections.ConfigDict, runs: list[Run], features: jax.Array,
                mesh: jax.sharding.Mesh) -> train.TrainState:
  """The runs' starting states, stacked `(R, ...)`: one compiled program builds them all."""
  rep = sharding.replicated(mesh)
  build = jax.jit(jax.vmap(functools.partial(_new_state, config), in_axes=(0, 0, None)),
                  in_shardings=rep, out_shardings=rep)
  t0 = time.time()
  logging.info("building the center banks (%s) of %d run(s): compiling and one pass over %d "
               "images...", config.model.center_init, len(runs), features.shape[0])
  states = build(*sharding.put((_stacked_keys(runs, 0), _stacked_keys(runs, 1), features), rep))
  jax.block_until_ready(states)
  logging.info("center banks (%s) of %d run(s) built in %.1f s", config.model.center_init,
               len(runs), time.time() - t0)
  return states


def state_template(config: ml_collections.ConfigDict, runs: list[Run], features_shape
                   ) -> train.TrainState:
  """A stacked state of the right structure and shapes to restore a checkpoint into.

  features_shape: (..., H, W, D) of the cached patch features.
  """
  *_, h, w, dim = features_shape
  states = jax.vmap(lambda key: train.create_train_state(config, key, dim))(
      _stacked_keys(runs, 0))
  return states.replace(center=jnp.zeros((len(runs), h * w, dim), jnp.float32))


class Trainer:
  """Trains the stacked states of `runs` over cached features, several epochs per call.

  `train(states, features, first_epoch, num_epochs)` runs epochs `first_epoch + 1 ..
  first_epoch + num_epochs` (1-based) and returns the new states and, per epoch and run, the
  epoch's mean step metrics as Python floats (the reference reports the mean over steps). The
  incoming states are donated. One compilation per distinct `num_epochs`, announced in the log.
  """

  def __init__(self, config: ml_collections.ConfigDict, runs: list[Run],
               mesh: jax.sharding.Mesh):
    self.runs, self.mesh = runs, mesh
    self._step = jax.vmap(train.make_train_step(config))
    self._batch_size = config.dataset.batch_size
    self._rep = sharding.replicated(mesh)
    self._train_keys, self._hparams = sharding.put(
        (_stacked_keys(runs, 2), hparams_of(runs)), self._rep)
    self._compiled: dict[int, Callable] = {}

  def _gather(self, features: jax.Array, idx: jax.Array) -> jax.Array:
    """`features[idx]` for `idx (R, B)`: `(R, B, H, W, D)`, B split over the mesh if it divides."""
    return jax.lax.with_sharding_constraint(
        features[idx], sharding.batch_layout(self.mesh, idx.shape[1], axis=1))

  def _epoch(self, states, features, keys, hparams):
    """One epoch of every run; `keys (R,)` are the runs' epoch keys. Metrics: mean over steps."""
    n = features.shape[0]
    perms, step_keys = jax.vmap(lambda key: epoch_plan(key, n, self._batch_size))(keys)
    full, rest = jax.vmap(lambda perm: center_lib.loader_batches(perm, self._batch_size))(perms)
    steps = full.shape[1]

    def body(states, xs):
      idx, k = xs
      return self._step(states, self._gather(features, idx), k, hparams)

    states, metrics = jax.lax.scan(
        body, states, (jnp.swapaxes(full, 0, 1), jnp.swapaxes(step_keys[:, :steps], 0, 1)))
    totals = jax.tree.map(lambda m: m.sum(0), metrics)
    if rest.shape[1]:  # the last partial batch: a step of its own size
      states, last = self._step(states, self._gather(features, rest), step_keys[:, steps],
                                hparams)
      totals = jax.tree.map(jnp.add, totals, last)
    return states, jax.tree.map(lambda t: t / step_keys.shape[1], totals)

  def _program(self, states, features, train_keys, hparams, first_epoch, *, num_epochs: int):
    def body(states, epoch):
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(train_keys, epoch)
      return self._epoch(states, features, keys, hparams)

    return jax.lax.scan(body, states, first_epoch + jnp.arange(num_epochs))

  def train(self, states: train.TrainState, features: jax.Array, first_epoch: int,
            num_epochs: int) -> tuple[train.TrainState, list[list[dict]]]:
    args = sharding.put((states, features, self._train_keys, self._hparams,
                         np.int32(first_epoch)), self._rep)
    compiled = self._compiled.get(num_epochs)
    if compiled is None:
      t0 = time.time()
      logging.info("compiling the training program (%d run(s), %d epoch(s) per call)...",
                   len(self.runs), num_epochs)
      compiled = jax.jit(functools.partial(self._program, num_epochs=num_epochs),
                         in_shardings=self._rep, out_shardings=self._rep,
                         donate_argnums=0).lower(*args).compile()
      logging.info("compiled in %.1f s", time.time() - t0)
      self._compiled[num_epochs] = compiled
    states, metrics = compiled(*args)
    metrics = {name: sharding.to_host(v) for name, v in metrics.items()}  # (E, R): one fetch
    return states, [[{name: float(v[e, r]) for name, v in metrics.items()}
                     for r in range(len(self.runs))] for e in range(num_epochs)]
