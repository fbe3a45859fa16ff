"""Train state, optimizer, the pure PBAS train step and patch scoring.

The step is a pure function `(state, features, key, hparams) -> (state, metrics)`: no Python side
effects, so the engine (`engine.py`) vmaps it over a run axis, scans it over an epoch's batches and
jits the whole epoch once; the torch parity test checks this same function.
"""
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pbas_jax import center as center_lib
from pbas_jax import heads
from pbas_jax import losses
from pbas_jax import synthesis as synthesis_lib

# The reference logs p_true / p_fake as the fractions on the right side of this score.
DSC_MARGIN = 0.5
SCORINGS = ("discriminator", "center_distance")
# Hyperparameters a step may take as traced values (`hparams`), so runs that differ only in them
# share one compiled program (the engine's run axis).
TRACED_HPARAMS = ("k", "noise_std")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; the heads' definitions ride along as static data.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: `{'projector': ..., 'discriminator': ...}`.
    batch_stats: `{'discriminator': ...}` BatchNorm running statistics (torch convention).
    opt_state: state of `make_optimizer`'s transformation.
    center: `(M, D)` center bank, or None until `center.init_center` has built it.
    ema_params: `params` averaged over steps (`train.param_ema > 0`, our addition), else None;
      evaluation uses them when present (`eval_params`).
    projector: the projector's Linen module (static).
    discriminator: the discriminator's Linen module (static).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  center: Optional[jax.Array]
  ema_params: Any
  projector: heads.Projector = flax.struct.field(pytree_node=False)
  discriminator: heads.Discriminator = flax.struct.field(pytree_node=False)

  @property
  def eval_params(self) -> Any:
    """The parameters that score: the averaged ones when `train.param_ema > 0`, else `params`."""
    return self.params if self.ema_params is None else self.ema_params


def make_optimizer(optim: ml_collections.ConfigDict, rbo: bool = True
                   ) -> optax.GradientTransformation:
  """The reference's two optimizers as one labelled transformation over `params`.

  Projector: torch Adam with `weight_decay` = coupled L2 (added to the gradient before Adam).
  Discriminator: torch AdamW, decoupled decay on all its parameters (`p -= lr * wd * p`); with
  `rbo=False` (ABL alone) the discriminator is frozen (no update, no decay).
  """
  dsc = (optax.adamw(optim.dsc_lr, weight_decay=optim.dsc_weight_decay) if rbo
         else optax.set_to_zero())
  return optax.multi_transform(
      {"projector": optax.chain(optax.add_decayed_weights(optim.proj_weight_decay),
                                optax.adam(optim.lr)),
       "discriminator": dsc},
      {"projector": "projector", "discriminator": "discriminator"})


def compute_dtype(config: ml_collections.ConfigDict):
  """The heads' matmul operand dtype (`train.compute_dtype`)."""
  name = config.train.compute_dtype
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"--config.train.compute_dtype={name!r}: use one of {tuple(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array, dim: int,
                       center: Optional[jax.Array] = None) -> TrainState:
  """Initial heads (reference init), optimizer state and, if given, the center bank.

  Args:
    config: uses `model.projector_layers`, `model.disc_hidden`, `model.disc_layers`, `model.rbo`,
      `optim.*`, `train.compute_dtype`, `train.param_ema`.
    key: PRNG key of the heads' initial parameters.
    dim: patch feature width `D` (the projector keeps it).
    center: `(M, D)` bank; usually built afterwards (`engine.init_states`).
  """
  dtype = compute_dtype(config)
  projector = heads.Projector(num_layers=config.model.projector_layers, dtype=dtype)
  discriminator = heads.Discriminator(hidden=config.model.disc_hidden,
                                      num_layers=config.model.disc_layers, dtype=dtype)
  key_p, key_d = jax.random.split(key)
  variables_d = discriminator.init(key_d, jnp.zeros((2, dim), jnp.float32), train=False)
  params = {"projector": projector.init(key_p, jnp.zeros((1, dim), jnp.float32))["params"],
            "discriminator": variables_d["params"]}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats={"discriminator": variables_d["batch_stats"]},
                    opt_state=make_optimizer(config.optim, config.model.rbo).init(params),
                    center=center, ema_params=params if config.train.param_ema > 0 else None,
                    projector=projector, discriminator=discriminator)


def make_train_step(config: ml_collections.ConfigDict) -> Callable:
  """The pure PBAS train step for `config` (`model.*`, `optim.*`, `train.param_ema`).

  The returned `step(state, features (B, H, W, D), key, hparams=None) -> (state, metrics)` does,
  as the reference: t = P(x) for all patches; nearest center rows (metric `model.center_metric`);
  L_c = mean ||t - c||; anomalies f (`model.synthesis`: AFS ray of length k * L_c, or Gaussian
  noise); logits of D on the joint batch [t; f] (BatchNorm statistics over both halves);
  L_n, L_a (`model.bce` semantics); one optimizer step on L_c + L_n + L_a. `key` is used by
  Gaussian synthesis only. `hparams` optionally maps names of `TRACED_HPARAMS` to scalar arrays
  that replace `model.k` / `model.noise_std` (traced, e.g. one value per vmapped run).

  Metrics (scalars): `loss`, `loss_c`, `r` (mean distance center -> t, = L_c) and
  `grad_norm_projector`; with the discriminator trained (`model.rbo`, the default) also `loss_n`,
  `loss_a`, `p_true` (fraction of normal patches scored < 0.5) and `p_fake` (fraction of synthetic
  ones scored >= 0.5) as the reference logs them, `r_fake` (mean distance center -> f) and
  `grad_norm_discriminator`. `model.rbo=False` (ABL alone) trains P on L_c only and leaves D
  untouched: no BatchNorm statistics, no weight decay, no discriminator metrics.
  """
  model = config.model
  rbo, bce = model.rbo, model.bce
  synthesis, metric = model.synthesis, model.center_metric
  if synthesis not in synthesis_lib.SYNTHESES:
    raise ValueError(f"model.synthesis={synthesis!r}: use one of {synthesis_lib.SYNTHESES}")
  center_lib.check_metric(metric)
  tx = make_optimizer(config.optim, rbo)
  ema = config.train.param_ema

  def step(state: TrainState, features: jax.Array, key: jax.Array,
           hparams: Optional[dict] = None):
    if state.center is None:
      raise ValueError("train step: the state has no center bank; build it first "
                       "(engine.init_states) and set it with state.replace(center=...)")
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
      metrics = {"loss_c": loss_c, "r": d.mean()}
      if not rbo:  # ABL alone (Table V): L_c only, D never applied.
        return loss_c, (state.batch_stats["discriminator"], metrics)
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
      loss_n, loss_a = losses.normal_loss(logits_t, bce), losses.anomaly_loss(logits_f, bce)
      metrics.update(loss_n=loss_n, loss_a=loss_a,
                     p_true=jnp.mean(jax.nn.sigmoid(logits_t) < DSC_MARGIN),
                     p_fake=jnp.mean(jax.nn.sigmoid(logits_f) >= DSC_MARGIN), r_fake=r_fake)
      return loss_c + loss_n + loss_a, (new_vars["batch_stats"], metrics)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=sum(metrics[name] for name in ("loss_c", "loss_n", "loss_a")
                                     if name in metrics),
                   grad_norm_projector=optax.tree.norm(grads["projector"]))
    if rbo:
      metrics["grad_norm_discriminator"] = optax.tree.norm(grads["discriminator"])
    ema_params = state.ema_params
    if ema_params is not None:  # train.param_ema (our addition): Polyak average per step
      ema_params = optax.incremental_update(params, ema_params, 1.0 - ema)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats={"discriminator": batch_stats}, opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, metrics

  return step


@functools.partial(jax.jit, static_argnames=("scoring", "metric"))
def score_patches(state: TrainState, features: jax.Array, scoring: str = "discriminator",
                  metric: str = "cosine") -> jax.Array:
  """Per-patch anomaly scores `(B, H, W)` of features `(B, H, W, D)`.

  `discriminator`: D's probability (BatchNorm in eval mode: running statistics), the reference's
  score. `center_distance`: the ABL-only score, distance of P(x) to its nearest center (`metric`
  matching). Uses `state.eval_params` (the averaged parameters under `train.param_ema`).
  """
  if scoring not in SCORINGS:
    raise ValueError(f"model.scoring={scoring!r}: use one of {SCORINGS}")
  b, h, w, dim = features.shape
  params = state.eval_params
  u = state.projector.apply({"params": params["projector"]},
                            features.reshape(-1, dim).astype(jnp.float32))
  if scoring == "discriminator":
    logits = state.discriminator.apply(
        {"params": params["discriminator"],
         "batch_stats": state.batch_stats["discriminator"]}, u, train=False)
    scores = jax.nn.sigmoid(logits)
  else:
    if state.center is None:
      raise ValueError("score_patches(scoring='center_distance') needs a state with a center bank")
    scores = center_lib.distance_scores(u, state.center, metric)
  return scores.reshape(b, h, w)
