"""The training engine: R runs of a class, an epoch (or several) per compiled call, on a mesh.

Every training goes through here; a single run is R = 1. The train state carries a leading run
axis R; the runs share one copy of the cached features and differ in their seed (initial heads,
center order, data orders) and anomaly degree `k` (a traced value of the step, so seeds x alpha
values share one compilation). Run r trains exactly as it would alone.

One call of `Trainer.train` is one jitted program over `num_epochs` epochs: each epoch's order and
per-step keys are derived on device from the run's key and the epoch number (`epoch_plan`), the
full batches run inside `jax.lax.scan`, the last partial batch is one more step of its own size (as
the reference's loader keeps it: BatchNorm statistics are those of that batch), metrics are summed
on device and fetched once per call (and, with `on_epoch`, reported to the host as each epoch
finishes), and the state is donated. A run's epoch is written for one run and mapped over the run
axis by `over_runs`: `jax.vmap` for R > 1, and for R = 1 the plain single-run program (the run
axis of one squeezed at entry, restored at exit). The step is the pure `train.make_train_step`.

Under `dataset.subsample < 1` each run trains on its own seed's subset of the cached features
(`image_subsets`), drawn as the run alone would draw it.

Sharding (`sharding.py`): the mesh is `(runs, data)` (`mesh_of`, rule in `sharding.mesh_shape`).
State, keys, alpha and subsets are split along their run axis over `runs`; the cached features
are split along images over `data` (`sharding.put_rows`) and each batch `(B, H, W, D)` is
gathered from them (`sharding.gather_rows`) split over `data` along B, or whole on the run's
`data` devices when their count does not divide B, so batch statistics are always those of the
whole batch. One device is a 1x1 mesh.
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
from pbas_jax import data
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


def mesh_of(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The `(runs, data)` mesh over `devices` (default: all) for the runs of `config`
  (`train.mesh`, `sharding.mesh_shape`)."""
  devices = jax.devices() if devices is None else devices
  runs = sharding.mesh_shape(config.train.mesh, len(runs_of(config)), len(devices))[0]
  return sharding.make_mesh(devices, runs=runs)


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
  """The per-run traced hyperparameters of the step: `{'k': (R,)}`."""
  return {"k": jnp.asarray([run.k for run in runs], jnp.float32)}


def image_subsets(config: ml_collections.ConfigDict, runs: list[Run], n: int) -> np.ndarray:
  """Each run's training images `(R, n')` among the `n` cached ones: all of them, or under
  `dataset.subsample < 1` (Table VII) the run's own draw from its seed, as if it ran alone."""
  return np.stack([data.subsample_indices(n, config.dataset.subsample, run.seed)
                   for run in runs]).astype(np.int32)


def over_runs(fn: Callable, num_runs: int, in_axes=0) -> Callable:
  """`fn` of one run mapped over a leading run axis of `num_runs` (like `jax.vmap(fn, in_axes)`).

  R > 1: `jax.vmap`, its run axis laid along the mesh's `runs` axis. R = 1: the run axis of one is
  dropped at entry and restored at exit, so the program is the single run's own: on XLA:CPU a
  vmapped program with a run axis of one costs 1.75x the plain step (issue 18).
  """
  if num_runs > 1:
    return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=sharding.RUNS)

  def single(*args):
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    args = [arg if axis is None else jax.tree.map(lambda x: x[0], arg)
            for arg, axis in zip(args, axes, strict=True)]
    return jax.tree.map(lambda x: x[None], fn(*args))

  return single


def epoch_plan(key: jax.Array, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """An epoch's image order `(n,)` and its per-step keys `(ceil(n / batch_size),)` from `key`.

  Step i trains on `perm[i * batch_size:(i + 1) * batch_size]` (the last batch may be partial).
  """
  if batch_size < 1:
    raise ValueError(f"dataset.batch_size={batch_size}: must be >= 1")
  key_perm, key_steps = jax.random.split(key)
  return jax.random.permutation(key_perm, n), jax.random.split(key_steps, -(-n // batch_size))


def _new_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, features: jax.Array,
               k_init: jax.Array, k_center: jax.Array, subset: jax.Array) -> train.TrainState:
  """A run's starting state: heads drawn from `k_init`, the ABL center over its images `subset`
  in the order drawn from `k_center` (the initial projector's parameters are traced, not
  constants). `features`: split over the mesh's `data` axis (`sharding.put_rows`)."""
  state = train.create_train_state(config, k_init, features.shape[-1])
  project = functools.partial(state.projector.apply, {"params": state.params["projector"]})
  center = center_lib.init_center(
      project, features, subset[jax.random.permutation(k_center, subset.shape[0])],
      config.dataset.batch_size, config.model.center_init, config.model.center_metric,
      config.model.center_ema, key=k_center, kmeans_iters=config.model.kmeans_iters,
      gather=functools.partial(sharding.gather_rows, mesh=mesh))
  return state.replace(center=center)


def _check_layout(runs: list[Run], mesh: jax.sharding.Mesh) -> None:
  if len(runs) % mesh.shape[sharding.RUNS]:
    raise ValueError(f"{len(runs)} run(s) cannot be split over a runs axis of "
                     f"{mesh.shape[sharding.RUNS]} devices: build the mesh with "
                     "engine.mesh_of(config)")


def init_states(config: ml_collections.ConfigDict, runs: list[Run], features,
                mesh: jax.sharding.Mesh) -> train.TrainState:
  """The runs' starting states, stacked `(R, ...)` and split over the mesh's `runs` axis: one
  compiled program builds them all.

  features: `(N, H, W, D)` cached training features (numpy or jax), split over `data` here.
  """
  _check_layout(runs, mesh)
  by_run = sharding.run_sharding(mesh)
  subsets = image_subsets(config, runs, features.shape[0])

  def build(features, *per_run):
    return over_runs(functools.partial(_new_state, config, mesh, features), len(runs))(*per_run)

  build = jax.jit(build, in_shardings=(sharding.rows_sharding(mesh),) + (by_run,) * 3,
                  out_shardings=by_run)
  t0 = time.time()
  logging.info("building the center banks (%s) of %d run(s): compiling and one pass over %d "
               "images...", config.model.center_init, len(runs), subsets.shape[1])
  states = build(sharding.put_rows(features, mesh), *sharding.put(
      (_stacked_keys(runs, 0), _stacked_keys(runs, 1), subsets), by_run))
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
  incoming states are donated; `features (N, H, W, D)` are split over the mesh's `data` axis once
  (pass the same array to every call). One compilation per distinct `num_epochs`, announced in
  the log.

  `on_epoch(epoch, metrics)`, when given, is called from inside the compiled program as each
  epoch finishes (`epoch` 1-based, `metrics` `{name: (R,) numpy}`), on process 0: progress during
  a call of many epochs. It costs one host callback per epoch.
  """

  def __init__(self, config: ml_collections.ConfigDict, runs: list[Run],
               mesh: jax.sharding.Mesh,
               on_epoch: Callable[[int, dict], None] | None = None):
    _check_layout(runs, mesh)
    self.runs, self.mesh, self._config, self._on_epoch = runs, mesh, config, on_epoch
    self._step = train.make_train_step(config)
    self._batch_size = config.dataset.batch_size
    self._by_run = sharding.run_sharding(mesh)
    self._train_keys, self._hparams = sharding.put(
        (_stacked_keys(runs, 2), hparams_of(runs)), self._by_run)
    self._features = None  # (the caller's features, them split over `data`, the runs' subsets)
    self._compiled: dict[int, Callable] = {}

  def _run_epoch(self, features, subset, state, key, hparams, epoch):
    """One epoch of one run over its images `subset (n,)`; `key`: the run's training key.
    Metrics: the mean over steps."""
    bs = self._batch_size
    perm, step_keys = epoch_plan(jax.random.fold_in(key, epoch), subset.shape[0], bs)
    full, rest = center_lib.loader_batches(subset[perm], bs)
    steps = full.shape[0]

    def step(state, idx, k):
      return self._step(state, sharding.gather_rows(features, idx, self.mesh), k, hparams)

    state, metrics = jax.lax.scan(lambda state, xs: step(state, *xs), state,
                                  (full, step_keys[:steps]))
    totals = jax.tree.map(lambda m: m.sum(0), metrics)
    if rest.shape[0]:  # the last partial batch: a step of its own size
      state, last = step(state, rest, step_keys[steps])
      totals = jax.tree.map(jnp.add, totals, last)
    return state, jax.tree.map(lambda t: t / step_keys.shape[0], totals)

  def _report(self, epoch, metrics):
    self._on_epoch(int(epoch) + 1, {name: np.asarray(v) for name, v in metrics.items()})

  def _program(self, states, features, subsets, train_keys, hparams, first_epoch, *,
               num_epochs: int):
    run_epoch = over_runs(functools.partial(self._run_epoch, features), len(self.runs),
                          in_axes=(0, 0, 0, 0, None))

    def body(states, epoch):
      states, metrics = run_epoch(subsets, states, train_keys, hparams, epoch)
      if self._on_epoch is not None:  # unordered: ordered effects allow one device only
        jax.debug.callback(self._report, epoch, metrics)
      return states, metrics

    return jax.lax.scan(body, states, first_epoch + jnp.arange(num_epochs))

  def _placed(self, features):
    """`features` split over `data` and the runs' image subsets, placed once per array."""
    if self._features is None or self._features[0] is not features:
      subsets = image_subsets(self._config, self.runs, features.shape[0])
      self._features = (features, sharding.put_rows(features, self.mesh),
                        sharding.put(subsets, self._by_run))
    return self._features[1:]

  def compiled(self, num_epochs: int):
    """The compiled program of `num_epochs` epochs per call (after a `train` call with them)."""
    return self._compiled[num_epochs]

  def train(self, states: train.TrainState, features, first_epoch: int,
            num_epochs: int) -> tuple[train.TrainState, list[list[dict]]]:
    rep = sharding.replicated(self.mesh)
    args = (sharding.put(states, self._by_run), *self._placed(features), self._train_keys,
            self._hparams, sharding.put(np.int32(first_epoch), rep))
    compiled = self._compiled.get(num_epochs)
    if compiled is None:
      t0 = time.time()
      logging.info("compiling the training program (%d run(s) on a %s mesh, %d epoch(s) per "
                   "call)...", len(self.runs), "x".join(map(str, self.mesh.devices.shape)),
                   num_epochs)
      per_epoch_run = jax.sharding.NamedSharding(self.mesh,
                                                 jax.sharding.PartitionSpec(None, sharding.RUNS))
      compiled = jax.jit(
          functools.partial(self._program, num_epochs=num_epochs),
          in_shardings=(self._by_run, sharding.rows_sharding(self.mesh), self._by_run,
                        self._by_run, self._by_run, rep),
          out_shardings=(self._by_run, per_epoch_run), donate_argnums=0).lower(*args).compile()
      logging.info("compiled in %.1f s", time.time() - t0)
      self._compiled[num_epochs] = compiled
    states, metrics = compiled(*args)
    metrics = {name: sharding.to_host(v) for name, v in metrics.items()}  # (E, R): one fetch
    return states, [[{name: float(v[e, r]) for name, v in metrics.items()}
                     for r in range(len(self.runs))] for e in range(num_epochs)]
