"""The three PBAS losses, each a batch mean: L_c (ABL, Eq. 6), L_n and L_a (RBO, Eqs. 8-9).

The discriminator returns logits z. L_n and L_a are binary cross-entropies of its scores against
the targets y = 0 (normal features) and y = 1 (synthetic anomalies). The reference computes them as
`torch.nn.Sigmoid` followed by `torch.nn.BCELoss` (reduction mean) in float32; `model.bce` selects
how this module does it:

- `reference` (default): torch's loss and gradient. p = sigmoid(z) is rounded to float32, so p is
  exactly 1 for z >= 16.64, exactly 0 for z < -88.72 and subnormal in between (-88.72, -87.34).
  Per element the loss is -(y log p + (1 - y) log(1 - p)) with each log clamped at -100; the
  backward is torch's: dL/dp = (p - y) / max((1 - p) p, 1e-12) / N, times Sigmoid's (1 - p) p.
  Hence a normal patch with z >= 16.64 costs exactly 100 and gets gradient exactly 0; a synthetic
  patch below z = -27.6 (where (1 - p) p < 1e-12) gets the vanishing gradient -1e12 p / N, exactly
  0 once p is 0, while costing up to 100. A synthetic patch with z >= 16.64 costs exactly 0 with
  gradient exactly 0.
- `stable` (our addition, not in the reference): -log sigmoid(+-z) = softplus(-+z), per element
  capped at 100 with zero gradient beyond the cap. Its gradient is (sigmoid(z) - y) / N, so a patch
  on the wrong side keeps a gradient of magnitude ~1/N until its loss reaches the cap (|z| = 100).

The two modes agree where the float32 sigmoid is far from saturation. Towards it `reference` keeps
the rounding of p: 1 - p is a multiple of 2^-24 near p = 1, so a normal patch's loss -log(1 - p)
is off the exact value by up to 6e-8 e^z (5e-4 at z = 9), as torch's is. Beyond saturation they
differ for wrong-side logits:
- a normal patch with z in [16.64, 100): `reference` loss 100 and gradient 0, `stable` loss z and
  gradient +1/N;
- a synthetic patch with z below -27.6: the same loss down to z = -88.72 (below it `reference`
  gives 100, `stable` |z| up to its cap), but the gradient is the vanishing -1e12 p / N in
  `reference` and -1/N in `stable` (until z = -100).

XLA on CPU flushes float32 subnormals to zero, where torch keeps them: in the band z in
(-88.72, -87.34) `reference` still returns torch's loss of a synthetic patch (log p = z there), but
its gradient is 0 instead of torch's 1e12 p / N (below 2e-26 / N), and a normal patch's loss
(p itself, below 1.2e-38) is 0.
"""
import functools

import jax
import jax.numpy as jnp

from pbas_jax import center as center_lib

BCE_MODES = ("reference", "stable")
BCE_LOG_CLAMP = 100.0  # torch's BCELoss clamps each log at -100
BCE_EPSILON = 1e-12    # torch's BCELoss backward divides by max((1 - p) p, EPSILON)


def center_loss(t: jax.Array, c_near: jax.Array) -> jax.Array:
  """L_c: mean Euclidean (not squared) distance of `t (N, D)` to its nearest centers `(N, D)`."""
  return center_lib.distance(t, c_near).mean()


def _log_sigmoid_float32(z: jax.Array, p: jax.Array) -> jax.Array:
  """torch's log(p) for its float32 p = sigmoid(z), also where XLA flushed a subnormal p to 0."""
  # Below the smallest normal float p = exp(z) to float32 precision, so log p = z; torch's p is 0
  # (log -inf) only once exp(-z) overflows.
  subnormal = jnp.where(jnp.isfinite(jnp.exp(-z)), z, -jnp.inf)
  return jnp.where(p >= jnp.finfo(jnp.float32).tiny, jnp.log(p), subnormal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _torch_bce(z: jax.Array, target: float) -> jax.Array:
  """BCELoss(Sigmoid(z), target) per element, float32, with torch's forward and backward."""
  return _torch_bce_fwd(z, target)[0]


def _torch_bce_fwd(z, target):
  p = jax.nn.sigmoid(z)
  log_p = jnp.maximum(_log_sigmoid_float32(z, p), -BCE_LOG_CLAMP)
  log_q = jnp.maximum(jnp.log1p(-p), -BCE_LOG_CLAMP)
  return (target - 1.0) * log_q - target * log_p, p


def _torch_bce_bwd(target, p, g):
  grad_p = g * (p - target) / jnp.maximum((1.0 - p) * p, BCE_EPSILON)
  return (grad_p * (1.0 - p) * p,)


_torch_bce.defvjp(_torch_bce_fwd, _torch_bce_bwd)


def bce(logits: jax.Array, target: float, mode: str) -> jax.Array:
  """BCE of sigmoid(`logits`) against a constant target 0 or 1 per element, float32 `(N,)`.

  `mode` is `model.bce`: `reference` (torch's Sigmoid + BCELoss, loss and gradient) or `stable`
  (our addition: softplus form capped at 100); see the module docstring for where they differ.
  """
  if mode not in BCE_MODES:
    raise ValueError(f"model.bce={mode!r}: use one of {BCE_MODES}")
  if target not in (0, 1):
    raise ValueError(f"bce: target must be 0 or 1, got {target}")
  z = jnp.asarray(logits).astype(jnp.float32)
  if mode == "reference":
    return _torch_bce(z, float(target))
  return jnp.minimum(jax.nn.softplus(-z if target == 1 else z), BCE_LOG_CLAMP)


def _mean_bce(logits: jax.Array, target: float, mode: str) -> jax.Array:
  return bce(logits, target, mode).mean()


def normal_loss(logits: jax.Array, bce: str = "reference") -> jax.Array:  # pylint: disable=redefined-outer-name
  """L_n: mean BCE of the normal features' scores `(N,)` against 0 (`bce`: `model.bce`)."""
  return _mean_bce(logits, 0, bce)


def anomaly_loss(logits: jax.Array, bce: str = "reference") -> jax.Array:  # pylint: disable=redefined-outer-name
  """L_a: mean BCE of the synthetic anomalies' scores `(N,)` against 1 (`bce`: `model.bce`)."""
  return _mean_bce(logits, 1, bce)
