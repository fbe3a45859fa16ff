"""Train state, optimizer, the PBAS train step and the epoch loop over cached features.

The step is a pure function `(state, features, key) -> (state, metrics)`: no Python side effects,
so it can be jitted (with the state donated), vmapped over a leading run axis (`multirun`) and
sharded over the batch axis (`make_jit_train_step(config, mesh)`).
"""
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pbas_jax import center as center_lib
from pbas_jax import heads
from pbas_jax import losses
from pbas_jax import sharding
from pbas_jax import synthesis as synthesis_lib

# The reference logs p_true / p_fake as the fractions on the right side of this score.
DSC_MARGIN = 0.5
SCORINGS = ("discriminator", "center_distance")
# Hyperparameters a step may take as traced values (`hparams`), so runs that differ only in them
# share one compiled program (`multirun`).
TRACED_HPARAMS = ("k", "noise_std")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the heads' definitions ride along as static data.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: `{'projector': ..., 'discriminator': ...}`.
    batch_stats: `{'discriminator': ...}` BatchNorm running statistics (torch convention).
    opt_state: state of `make_optimizer`'s transformation.
    center: `(M, D)` center bank, or None until `center.init_center` has built it.
    projector: the projector's Linen module (static).
    discriminator: the discriminator's Linen module (static).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  center: Optional[jax.Array]
  projector: heads.Projector = flax.struct.field(pytree_node=False)
  discriminator: heads.Discriminator = flax.struct.field(pytree_node=False)

  def project(self, x: jax.Array) -> jax.Array:
    """P applied to `x (..., D)` with the current parameters."""
    return self.projector.apply({"params": self.params["projector"]}, x)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The reference's two optimizers as one labelled transformation over `params`.

  Projector: torch Adam with `weight_decay` = coupled L2 (added to the gradient before Adam).
  Discriminator: torch AdamW, decoupled decay on all its parameters (`p -= lr * wd * p`).
  """
  return optax.multi_transform(
      {"projector": optax.chain(optax.add_decayed_weights(optim.proj_weight_decay),
                                optax.adam(optim.lr)),
       "discriminator": optax.adamw(optim.dsc_lr, weight_decay=optim.dsc_weight_decay)},
      {"projector": "projector", "discriminator": "discriminator"})


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array, dim: int,
                       center: Optional[jax.Array] = None) -> TrainState:
  """Initial heads (reference init), optimizer state and, if given, the center bank.

  Args:
    config: uses `model.projector_layers`, `model.disc_hidden`, `model.disc_layers`, `optim.*`.
    key: PRNG key of the heads' initial parameters.
    dim: patch feature width `D` (the projector keeps it).
    center: `(M, D)` bank; usually built afterwards with `center.init_center(state.project, ...)`
      and set with `state.replace(center=...)`.
  """
  projector = heads.Projector(num_layers=config.model.projector_layers)
  discriminator = heads.Discriminator(hidden=config.model.disc_hidden,
                                      num_layers=config.model.disc_layers)
  key_p, key_d = jax.random.split(key)
  variables_d = discriminator.init(key_d, jnp.zeros((2, dim), jnp.float32), train=False)
  params = {"projector": projector.init(key_p, jnp.zeros((1, dim), jnp.float32))["params"],
            "discriminator": variables_d["params"]}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats={"discriminator": variables_d["batch_stats"]},
                    opt_state=make_optimizer(config.optim).init(params), center=center,
                    projector=projector, discriminator=discriminator)


def make_train_step(config: ml_collections.ConfigDict) -> Callable:
  """The pure PBAS train step for `config` (`model.*`, `optim.*`).

  The returned `step(state, features (B, H, W, D), key, hparams=None) -> (state, metrics)` does,
  as the reference: t = P(x) for all patches; nearest center rows (metric `model.center_metric`);
  L_c = mean ||t - c||; anomalies f (`model.synthesis`: AFS ray of length k * L_c, or Gaussian
  noise); logits of D on the joint batch [t; f] (BatchNorm statistics over both halves);
  L_n, L_a; one optimizer step on L_c + L_n + L_a. `key` is used by Gaussian synthesis only.
  `hparams` optionally maps names of `TRACED_HPARAMS` to scalar arrays that replace `model.k` /
  `model.noise_std` (traced, e.g. one value per vmapped run).

  Metrics (scalars): `loss`, `loss_c`, `loss_n`, `loss_a`; `p_true` (fraction of normal patches
  scored < 0.5) and `p_fake` (fraction of synthetic ones scored >= 0.5), as the reference logs
  them; `r` (mean distance center -> t, = L_c) and `r_fake` (mean distance center -> f);
  `grad_norm_projector`, `grad_norm_discriminator` (global L2 norms of the gradients).
  """
  model = config.model
  rbo = model.rbo
  synthesis, metric = model.synthesis, model.center_metric
  if synthesis not in synthesis_lib.SYNTHESES:
    raise ValueError(f"model.synthesis={synthesis!r}: use one of {synthesis_lib.SYNTHESES}")
  center_lib.check_metric(metric)
  tx = make_optimizer(config.optim)

  def step(state: TrainState, features: jax.Array, key: jax.Array,
           hparams: Optional[dict] = None):
    if state.center is None:
      raise ValueError("train step: the state has no center bank; build it with "
                       "center.init_center(state.project, ...) and state.replace(center=...)")
    hparams = hparams or {}
    unknown = set(hparams) - set(TRACED_HPARAMS)
    if unknown:
      raise ValueError(f"train step: hparams {sorted(unknown)} cannot be traced; use "
                       f"{TRACED_HPARAMS}")
    k = hparams.get("k", model.k)
    noise_std = hparams.get("noise_std", model.noise_std)
    x = features.reshape(-1, features.shape[-1]).astype(jnp.float32)
    n = x.shape[0]

    def loss_fn(params):
      t = state.projector.apply({"params": params["projector"]}, x)
      idx, c_near = center_lib.nearest(t, state.center, metric)
      loss_c = losses.center_loss(t, c_near)
      d = jax.lax.stop_gradient(center_lib.distance(t, c_near))
      variables = {"params": params["discriminator"],
                   "batch_stats": state.batch_stats["discriminator"]}
      if synthesis == "ray":
        # [t; f] through D's first layer in one N-row matmul (heads.ray_pair_dense).
        s = synthesis_lib.ray_scale(d, k)
        logits, new_vars = state.discriminator.apply(
            variables, t, train=True, ray=(state.center, idx, s), mutable=["batch_stats"])
        r_fake = ((1 + s) * d).mean()
      else:
        f = synthesis_lib.gaussian(t, key, noise_std)
        logits, new_vars = state.discriminator.apply(
            variables, jnp.concatenate([t, f]), train=True, mutable=["batch_stats"])
        r_fake = center_lib.distance(f, c_near).mean()
      logits_t, logits_f = logits[:n], logits[n:]
      loss_n, loss_a = losses.normal_loss(logits_t), losses.anomaly_loss(logits_f)
      metrics = {"loss_c": loss_c, "loss_n": loss_n, "loss_a": loss_a,
                 "p_true": jnp.mean(jax.nn.sigmoid(logits_t) < DSC_MARGIN),
                 "p_fake": jnp.mean(jax.nn.sigmoid(logits_f) >= DSC_MARGIN),
                 "r": d.mean(), "r_fake": r_fake}
      # model.rbo=False is "ABL alone" (Table V): P learns from L_c only; D is not trained.
      total = loss_c + loss_n + loss_a if rbo else loss_c
      return total, (new_vars["batch_stats"], metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = dict(metrics,
                   loss=(metrics["loss_c"] + metrics["loss_n"] + metrics["loss_a"]) if rbo
                   else metrics["loss_c"],
                   grad_norm_projector=optax.tree.norm(grads["projector"]),
                   grad_norm_discriminator=optax.tree.norm(grads["discriminator"]))
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats={"discriminator": batch_stats}, opt_state=opt_state)
    return new_state, metrics

  return step


def make_jit_train_step(config: ml_collections.ConfigDict,
                        mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """`make_train_step(config)` jitted, the incoming state donated (do not reuse it).

  With `mesh`, data parallel: the state, key and metrics are replicated on every device and the
  batch is split over them (`sharding.batch_sharding`); a batch whose size the device count does
  not divide runs replicated (`sharding.batch_layout`), so the batch statistics are always those
  of the whole batch. Arguments are placed first, so host batches and states from elsewhere are
  accepted. One compilation per batch shape.
  """
  step = make_train_step(config)
  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  rep = sharding.replicated(mesh)
  jitted = {layout: jax.jit(step, in_shardings=(rep, layout, rep), out_shardings=rep,
                            donate_argnums=0)
            for layout in (sharding.batch_sharding(mesh), rep)}

  def sharded_step(state: TrainState, features, key: jax.Array):
    layout = sharding.batch_layout(mesh, features.shape[0])
    return jitted[layout](sharding.put(state, rep), sharding.put(features, layout),
                          sharding.put(key, rep))

  return sharded_step


@jax.jit
def accumulate(total, metrics):
  """`total + metrics` leaf by leaf (step metrics summed on device over an epoch)."""
  return jax.tree.map(jnp.add, total, metrics)


def train_epoch(step_fn: Callable, state: TrainState, features, key: jax.Array,
                batch_size: int) -> tuple[TrainState, dict]:
  """One epoch over cached features, in a fresh random order, the last partial batch kept.

  Metrics stay on device and are fetched once, at the end.

  Args:
    step_fn: a train step, typically `make_jit_train_step(config)`.
    state: the train state (donated if `step_fn` donates).
    features: `(N, H, W, D)` cached features, a device array or a host numpy array (batches are
      then gathered on the host and transferred).
    key: PRNG key of this epoch (order and per-step keys).
    batch_size: images per step (the reference's loader: shuffle, drop_last=False).

  Returns:
    The new state and the epoch's metrics: the mean over steps (as the reference reports them),
    as Python floats.
  """
  perm, step_keys = epoch_plan(key, features.shape[0], batch_size)
  if isinstance(features, np.ndarray):
    perm = np.asarray(perm)  # one transfer per epoch; host batches are gathered on the host
  total = None
  for i, start in enumerate(range(0, len(perm), batch_size)):
    batch = features[perm[start:start + batch_size]]
    state, metrics = step_fn(state, batch, step_keys[i])
    total = metrics if total is None else accumulate(total, metrics)
  means = jax.device_get(total)
  return state, {name: float(v) / len(step_keys) for name, v in means.items()}


def epoch_plan(key: jax.Array, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """An epoch's image order `(n,)` and its per-step keys `(ceil(n / batch_size),)` from `key`.

  Step i trains on `perm[i * batch_size:(i + 1) * batch_size]` (the last batch may be partial).
  """
  if batch_size < 1:
    raise ValueError(f"dataset.batch_size={batch_size}: must be >= 1")
  key_perm, key_steps = jax.random.split(key)
  return jax.random.permutation(key_perm, n), jax.random.split(key_steps, -(-n // batch_size))


@functools.partial(jax.jit, static_argnames=("scoring", "metric"))
def score_patches(state: TrainState, features: jax.Array, scoring: str = "discriminator",
                  metric: str = "cosine") -> jax.Array:
  """Per-patch anomaly scores `(B, H, W)` of features `(B, H, W, D)`.

  `discriminator`: D's probability (BatchNorm in eval mode: running statistics), the reference's
  score. `center_distance`: the ABL-only score, distance of P(x) to its nearest center (`metric`
  matching).
  """
  if scoring not in SCORINGS:
    raise ValueError(f"model.scoring={scoring!r}: use one of {SCORINGS}")
  b, h, w, dim = features.shape
  u = state.project(features.reshape(-1, dim).astype(jnp.float32))
  if scoring == "discriminator":
    logits = state.discriminator.apply(
        {"params": state.params["discriminator"],
         "batch_stats": state.batch_stats["discriminator"]}, u, train=False)
    scores = jax.nn.sigmoid(logits)
  else:
    if state.center is None:
      raise ValueError("score_patches(scoring='center_distance') needs a state with a center bank")
    scores = center_lib.distance_scores(u, state.center, metric)
  return scores.reshape(b, h, w)
