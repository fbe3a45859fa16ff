"""L_c, L_n, L_a: hand-written numpy on tiny inputs, and `model.bce=reference` against torch."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require
from pbas_jax import losses

LOSSES = {0: losses.normal_loss, 1: losses.anomaly_loss}
# The probe points: unsaturated, around torch's float32 saturation (16.64) and far beyond.
PROBES = np.array([0.0, 5, -5, 17, -17, 20, -20, 30, -30, 50, -50, 120, -120], np.float32)


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


def _exact_bce(z, target):
  """-log of the exact (float64) sigmoid probability of `target`, capped at 100."""
  z = np.asarray(z, np.float64)
  return np.minimum(np.logaddexp(0.0, -z if target == 1 else z), 100.0)


def _float32_p_bce(z, target):
  """-log of the probability of `target` from p = sigmoid(z) rounded to float32, as torch's."""
  p = (1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))).astype(np.float32).astype(np.float64)
  return np.minimum(-np.log(p if target == 1 else 1.0 - p), 100.0)


MODERATE = np.array([-8.0, -1.5, -0.1, 0.0, 0.3, 2.0, 9.0], np.float32)


@pytest.mark.parametrize("mode", losses.BCE_MODES)
@pytest.mark.parametrize("target", [0, 1])
def test_modes_agree_with_exact_bce_where_sigmoid_is_not_saturated(mode, target):
  fn = LOSSES[target]
  want = (_float32_p_bce if mode == "reference" else _exact_bce)(MODERATE, target)
  np.testing.assert_allclose(fn(MODERATE, mode), want.mean(), rtol=1e-6)
  # d/dz of the mean BCE is (sigmoid(z) - target) / N; `reference` rounds p to float32 first.
  grad = jax.grad(fn)(jnp.asarray(MODERATE), mode)
  p = 1.0 / (1.0 + np.exp(-MODERATE.astype(np.float64)))
  if mode == "reference":
    p = p.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(grad, (p - target) / MODERATE.size, rtol=1e-5, atol=1e-9)


@pytest.fixture(name="torch")
def _torch():
  require(importlib.util.find_spec("torch") is not None, "torch missing: install the convert extra")
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def torch_bce(torch, z, target):
  """The reference: Sigmoid then BCELoss (mean) in float32; the loss and its gradient w.r.t. z."""
  z = torch.tensor(np.asarray(z, np.float32), requires_grad=True)
  p = torch.nn.Sigmoid()(z)
  loss = torch.nn.BCELoss()(p, torch.full_like(p, float(target)))
  loss.backward()
  return loss.item(), z.grad.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("target", [0, 1])
def test_reference_mode_is_torchs_loss_and_gradient(torch, target):
  want_loss, want_grad = torch_bce(torch, PROBES, target)
  loss, grad = jax.value_and_grad(LOSSES[target])(jnp.asarray(PROBES), "reference")
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  zero = want_grad == 0
  # Saturated wrong-side normal patches (loss 100) and saturated right-side synthetic ones.
  assert zero.sum() >= 4
  np.testing.assert_array_equal(np.asarray(grad)[zero], 0.0)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=0)
  # Per element too: the clamp at 100 and the exact zeros of the saturated sigmoid.
  for z in PROBES:
    want_loss, want_grad = torch_bce(torch, [z], target)
    loss, grad = jax.value_and_grad(LOSSES[target])(jnp.asarray([z]), "reference")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=0, err_msg=f"z={z}")
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=0, err_msg=f"z={z}")


@pytest.mark.parity
@pytest.mark.parametrize("target", [0, 1])
def test_reference_mode_matches_torch_on_a_dense_sweep(torch, target):
  z = np.linspace(-110, 40, 3001, dtype=np.float32)
  p = torch.sigmoid(torch.from_numpy(z))
  want = torch.nn.functional.binary_cross_entropy(
      p, torch.full_like(p, float(target)), reduction="none").numpy()
  # XLA flushes float32 subnormals, torch keeps them: losses below the smallest normal float and
  # gradients below 2e-26 / N (from a subnormal p) are 0 here.
  np.testing.assert_allclose(losses.bce(z, target, "reference"), want, rtol=2e-6,
                             atol=np.finfo(np.float32).tiny)
  _, want_grad = torch_bce(torch, z, target)
  grad = np.asarray(jax.grad(LOSSES[target])(jnp.asarray(z), "reference"))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=2e-26 / z.size)
  np.testing.assert_array_equal(grad[want_grad == 0], 0.0)


@pytest.mark.parity
def test_reference_mode_keeps_torchs_loss_in_the_subnormal_band(torch):
  z = np.array([-87.5, -88.0, -88.5], np.float32)  # torch's p is a float32 subnormal here
  want_loss, want_grad = torch_bce(torch, z, 1)
  loss, grad = jax.value_and_grad(losses.anomaly_loss)(jnp.asarray(z), "reference")
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  assert want_loss < 90  # not the clamp at 100
  assert np.all(np.abs(np.asarray(grad) - want_grad) < 1e-26)


def test_reference_mode_saturates_like_torch_float32():
  """Without torch: the documented consequences of rounding p = sigmoid(z) to float32."""
  z = jnp.array([17.0, 50.0, -17.0, -50.0, -120.0])
  n = z.size
  per_normal = np.asarray(losses.bce(z, 0, "reference"))
  np.testing.assert_array_equal(per_normal[:2], 100.0)  # p == 1: log(1 - p) clamped
  grad_normal = np.asarray(jax.grad(losses.normal_loss)(z))
  np.testing.assert_array_equal(grad_normal[:2], 0.0)
  np.testing.assert_array_equal(losses.bce(z[:2], 1, "reference"), 0.0)
  grad_anomaly = np.asarray(jax.grad(losses.anomaly_loss)(z))
  np.testing.assert_array_equal(grad_anomaly[:2], 0.0)
  np.testing.assert_allclose(grad_anomaly[2], -1.0 / n, rtol=1e-6)  # before the 1e-12 floor
  # Below z = -27.6 the 1e-12 floor makes it -1e12 p / N; 0 once p is 0.
  np.testing.assert_allclose(grad_anomaly[3], -1e12 * np.exp(-50.0) / n, rtol=1e-5)
  assert grad_anomaly[4] == 0.0
  np.testing.assert_allclose(losses.bce(z[3:], 1, "reference"), [50.0, 100.0], rtol=1e-6)


@pytest.mark.parametrize("target", [0, 1])
def test_stable_mode_keeps_a_unit_gradient_on_the_wrong_side(target):
  """Our addition: the exact value and -+1/N up to the cap at 100, where `reference` saturates."""
  z = jnp.asarray(PROBES)
  per_elem = np.asarray(losses.bce(z, target, "stable"))
  np.testing.assert_allclose(per_elem, _exact_bce(PROBES, target), rtol=1e-6, atol=1e-30)
  grad = np.asarray(jax.grad(LOSSES[target])(z, "stable"))
  assert np.all(np.isfinite(grad))
  wrong = (PROBES > 0) if target == 0 else (PROBES < 0)
  sign = 1.0 if target == 0 else -1.0
  far = wrong & (np.abs(PROBES) >= 17) & (np.abs(PROBES) < 100)
  np.testing.assert_allclose(grad[far], sign / PROBES.size, rtol=1e-6)
  capped = wrong & (np.abs(PROBES) > 100)
  np.testing.assert_array_equal(per_elem[capped], 100.0)
  np.testing.assert_array_equal(grad[capped], 0.0)
  # Where the modes differ: `reference` gives these normal patches loss 100 and gradient 0.
  if target == 0:
    ref_grad = np.asarray(jax.grad(LOSSES[target])(z, "reference"))
    np.testing.assert_array_equal(ref_grad[far], 0.0)


def test_reference_mode_under_jit_and_vmap():
  rows = jnp.asarray(np.stack([PROBES, -PROBES, PROBES[::-1] * 0.3]))

  def total(z):
    return losses.normal_loss(z[:6]) + losses.anomaly_loss(z[6:])

  eager = [jax.value_and_grad(total)(r) for r in rows]
  loss, grad = jax.jit(jax.vmap(jax.value_and_grad(total)))(rows)
  np.testing.assert_allclose(loss, [e[0] for e in eager], rtol=1e-6)
  np.testing.assert_allclose(grad, np.stack([e[1] for e in eager]), rtol=1e-6, atol=0)
  np.testing.assert_array_equal(grad == 0, np.stack([e[1] for e in eager]) == 0)


def test_bce_accepts_bfloat16_logits_and_computes_in_float32():
  z = jnp.asarray(PROBES, jnp.bfloat16)
  np.testing.assert_array_equal(losses.bce(z, 0, "reference"),
                                losses.bce(z.astype(jnp.float32), 0, "reference"))
  assert jax.grad(losses.normal_loss)(z).dtype == jnp.bfloat16


def test_bce_rejects_soft_targets_and_unknown_modes():
  with pytest.raises(ValueError, match="target must be 0 or 1"):
    losses.bce(jnp.zeros(3), 0.5, "reference")
  with pytest.raises(ValueError, match="model.bce"):
    losses.normal_loss(jnp.zeros(3), "softplus")
