"""AFS (Eq. 7) and Gaussian-noise synthesis: values, geometry, gradients, zero-distance guard."""
import jax
import jax.numpy as jnp
import numpy as np

from pbas_jax import synthesis


def _case(seed=0, n=12, d=5):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(np.float32),
          rng.normal(size=(n, d)).astype(np.float32))


def test_ray_matches_numpy():
  t, c = _case()
  k = 0.25
  v = t.astype(np.float64) - c
  dist = np.linalg.norm(v, axis=1, keepdims=True)
  expected = t + k * dist.mean() * v / dist
  np.testing.assert_allclose(synthesis.ray(t, c, k), expected, rtol=1e-5, atol=1e-6)


def test_ray_geometry_length_and_direction():
  t, c = _case(seed=1)
  k = 0.3
  f = np.asarray(synthesis.ray(t, c, k), np.float64)
  r = np.linalg.norm(t.astype(np.float64) - c, axis=1).mean()
  offset = f - t
  np.testing.assert_allclose(np.linalg.norm(offset, axis=1), k * r, rtol=1e-5)
  unit_ray = (t - c) / np.linalg.norm(t - c, axis=1, keepdims=True)
  np.testing.assert_allclose(offset / np.linalg.norm(offset, axis=1, keepdims=True), unit_ray,
                             atol=1e-5)


def test_ray_offset_carries_no_gradient():
  t, c = _case(seed=2)
  w = np.random.default_rng(3).normal(size=t.shape).astype(np.float32)
  grad_t, grad_c = jax.grad(lambda t, c: jnp.sum(synthesis.ray(t, c, 0.25) * w),
                            argnums=(0, 1))(jnp.asarray(t), jnp.asarray(c))
  np.testing.assert_allclose(grad_t, w, rtol=1e-6)  # d f / d t = identity
  np.testing.assert_array_equal(grad_c, 0.0)


def test_ray_scale_zero_distance_guard():
  d = jnp.array([0.0, 2.0, 4.0])
  s = synthesis.ray_scale(d, 0.5)
  np.testing.assert_allclose(s, [0.0, 0.5 * 2.0 / 2.0, 0.5 * 2.0 / 4.0], rtol=1e-6)
  t, c = _case(seed=4, n=4)
  c[1] = t[1]
  f = synthesis.ray(t, c, 0.25)
  assert np.all(np.isfinite(f))
  np.testing.assert_array_equal(f[1], t[1])
  # The coincident row counts as distance 0 in r.
  r = np.linalg.norm(t.astype(np.float64) - c, axis=1).mean()
  np.testing.assert_allclose(np.linalg.norm(f[0] - t[0]), 0.25 * r, rtol=1e-5)
  grad = jax.grad(lambda t: synthesis.ray(t, c, 0.25).sum())(jnp.asarray(t))
  assert np.all(np.isfinite(grad))


def test_gaussian_noise_statistics_and_key():
  t = jnp.zeros((4000, 8))
  f = synthesis.gaussian(t, jax.random.key(0), 0.015)
  noise = np.asarray(f - t)
  assert abs(noise.mean()) < 0.015 * 0.05
  np.testing.assert_allclose(noise.std(), 0.015, rtol=0.02)
  np.testing.assert_array_equal(f, synthesis.gaussian(t, jax.random.key(0), 0.015))
  assert not np.allclose(f, synthesis.gaussian(t, jax.random.key(1), 0.015))
