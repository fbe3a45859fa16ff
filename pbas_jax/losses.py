"""The three PBAS losses, each a batch mean: L_c (ABL, Eq. 6), L_n and L_a (RBO, Eqs. 8-9).

The discriminator returns logits. The BCE terms are computed from them stably
(`-log sigmoid(z) = softplus(-z)`) and, like torch's BCELoss which clamps each log at -100, each
per-patch term is capped at 100 (with zero gradient beyond the cap, as in torch). The values agree
with torch's wherever its float32 sigmoid does not round to exactly 0 or 1; beyond that (a
wrong-side logit of about 17 to 100) torch already returns the cap, this module the exact value.
"""
import jax
import jax.numpy as jnp

from pbas_jax import center as center_lib

BCE_LOG_CLAMP = 100.0


def center_loss(t: jax.Array, c_near: jax.Array) -> jax.Array:
  """L_c: mean Euclidean (not squared) distance of `t (N, D)` to its nearest centers `(N, D)`."""
  return center_lib.distance(t, c_near).mean()


def bce_with_logits(logits: jax.Array, target: float) -> jax.Array:
  """torch BCELoss(sigmoid(logits), target) for a constant target 0 or 1: per-element `(N,)`."""
  if target not in (0, 1):
    raise ValueError(f"bce_with_logits: target must be 0 or 1, got {target}")
  z = logits if target == 1 else -logits
  return jnp.minimum(jax.nn.softplus(-z), BCE_LOG_CLAMP)


def normal_loss(logits: jax.Array) -> jax.Array:
  """L_n: BCE of the normal features' scores against 0."""
  return bce_with_logits(logits, 0.0).mean()


def anomaly_loss(logits: jax.Array) -> jax.Array:
  """L_a: BCE of the synthetic anomalies' scores against 1."""
  return bce_with_logits(logits, 1.0).mean()
