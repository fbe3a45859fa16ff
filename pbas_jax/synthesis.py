"""AFS: anomaly features synthesized along the ray from the nearest center (Eq. 7), and the
Gaussian-noise synthesis of SimpleNet (the paper's ablation)."""
import jax
import jax.numpy as jnp

from pbas_jax import center as center_lib

SYNTHESES = ("ray", "gaussian")


def ray_scale(d: jax.Array, k: float) -> jax.Array:
  """Per-row factor `s = k r / d` of the AFS offset `s (t - c)`, with `r = mean(d)` (= L_c).

  Rows sitting exactly on their center get `s = 0` (no direction to follow) instead of the
  reference's NaN. Carries no gradient.

  Args:
    d: `(N,)` distances of the normal features to their nearest centers.
    k: anomaly degree (alpha of Eq. 7).

  Returns:
    `s (N,)`.
  """
  d = jax.lax.stop_gradient(d)
  return jnp.where(d > 0, k * d.mean() / jnp.where(d > 0, d, 1.0), 0.0)


def ray(t: jax.Array, c_near: jax.Array, k: float) -> jax.Array:
  """Eq. 7: `f = t + stop_gradient(k r (t - c) / ||t - c||)` for `t, c_near (N, D)`.

  Every offset has length `k r` (`r` = batch-mean distance) and points away from the nearest
  center; gradients reach `t` only through the first term.
  """
  s = ray_scale(center_lib.distance(t, c_near), k)
  return t + jax.lax.stop_gradient(s[:, None] * (t - c_near))


def gaussian(t: jax.Array, key: jax.Array, std: float) -> jax.Array:
  """SimpleNet's synthesis: `t` plus i.i.d. N(0, std^2) noise, `(N, D)`."""
  return t + std * jax.random.normal(key, t.shape, t.dtype)
