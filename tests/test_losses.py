"""L_c, L_n, L_a against hand-written numpy on tiny inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pbas_jax import losses


def test_center_loss_is_mean_euclidean_distance():
  t = np.array([[3.0, 4.0], [1.0, 1.0], [0.0, -2.0]], np.float32)
  c = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], np.float32)
  expected = np.mean([5.0, 1.0, 2.0])
  np.testing.assert_allclose(losses.center_loss(t, c), expected, rtol=1e-6)


def test_center_loss_zero_distance_has_finite_zero_gradient():
  t = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  c = jnp.array([[1.0, 2.0], [0.0, 0.0]])  # row 0 sits on its center
  value, grad = jax.value_and_grad(losses.center_loss)(t, c)
  np.testing.assert_allclose(value, 5.0 / 2, rtol=1e-6)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[0], [0.0, 0.0])
  np.testing.assert_allclose(grad[1], np.array([3.0, 4.0]) / 5.0 / 2, rtol=1e-6)


def _torch_style_bce(z, target):
  """BCELoss(sigmoid(z), target) in float64 with torch's log clamp at -100."""
  p = 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
  with np.errstate(divide="ignore"):
    log = np.log(p) if target == 1 else np.log(1.0 - p)
  return -np.maximum(log, -100.0)


MODERATE = np.array([-8.0, -1.5, -0.1, 0.0, 0.3, 2.0, 9.0], np.float32)


@pytest.mark.parametrize("fn,target", [(losses.normal_loss, 0), (losses.anomaly_loss, 1)])
def test_bce_losses_match_hand_computation(fn, target):
  np.testing.assert_allclose(fn(MODERATE), _torch_style_bce(MODERATE, target).mean(), rtol=1e-6)
  # d/dz of the mean BCE is (sigmoid(z) - target) / N.
  grad = jax.grad(fn)(jnp.asarray(MODERATE))
  p = 1.0 / (1.0 + np.exp(-MODERATE.astype(np.float64)))
  np.testing.assert_allclose(grad, (p - target) / MODERATE.size, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("fn,target", [(losses.normal_loss, 0), (losses.anomaly_loss, 1)])
def test_bce_extreme_logits_are_finite_and_clamped_like_torch(fn, target):
  z = np.array([-1e4, -300.0, -40.0, 40.0, 300.0, 1e4], np.float32)
  per_elem = np.asarray(losses.bce_with_logits(jnp.asarray(z), target))
  # Wrong-side logits beyond 100 hit torch's cap; right-side ones cost ~0; +-40 is exact (40).
  wrong = z > 0 if target == 0 else z < 0
  np.testing.assert_allclose(per_elem[wrong], [40.0, 100.0, 100.0] if target == 0
                             else [100.0, 100.0, 40.0], rtol=1e-6)
  assert np.all(per_elem[~wrong] < 1e-15)
  np.testing.assert_allclose(fn(z), per_elem.mean(), rtol=1e-6)
  grad = jax.grad(fn)(jnp.asarray(z))
  assert np.all(np.isfinite(grad))
  # Past the cap the gradient is 0, as torch's (saturated sigmoid) one.
  capped = np.abs(z) > 100
  np.testing.assert_array_equal(grad[capped & wrong], 0.0)


def test_bce_rejects_soft_targets():
  with pytest.raises(ValueError, match="target must be 0 or 1"):
    losses.bce_with_logits(jnp.zeros(3), 0.5)
