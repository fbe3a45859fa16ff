"""The nearest-neighbour yardstick: distance of each test patch to a bank of training patches."""
import jax.numpy as jnp
import numpy as np
import pytest

from pbas_jax import inference


def _brute_force(features, bank):
  """(B, H, W, D), (M, D) -> (B, H, W): every pairwise distance in float64, then the minimum."""
  a = features.reshape(-1, features.shape[-1]).astype(np.float64)
  d = np.sqrt(((a[:, None, :] - bank[None].astype(np.float64)) ** 2).sum(-1))
  return d.min(1).reshape(features.shape[:3])


def _random(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_matches_brute_force_for_any_chunk(chunk):
  # 37 bank rows: chunks of 8 leave a last chunk that overlaps the one before it; 100 > M.
  features, bank = _random(0, 2, 3, 4, 5), _random(1, 37, 5)
  got = inference.nearest_neighbour_scores(features, bank, chunk=chunk)
  assert got.shape == (2, 3, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _brute_force(features, bank), rtol=1e-5, atol=1e-5)


def test_chunk_size_does_not_change_the_scores():
  features, bank = _random(2, 3, 4, 4, 16), 3 * _random(3, 250, 16)
  scores = [np.asarray(inference.nearest_neighbour_scores(features, bank, chunk=c))
            for c in (1, 7, 64, 250, 1000)]
  for other in scores[1:]:
    np.testing.assert_allclose(other, scores[0], rtol=1e-6, atol=1e-6)


def test_a_bank_row_scores_zero_not_nan():
  # ||a||^2 - 2ab + ||b||^2 of a == b rounds to within a few float32 ulps of ||a||^2 either side
  # of 0: clamped, so the distance is finite and at most about sqrt(eps) ||a||.
  bank = 10 * _random(4, 20, 8)
  features = bank[[3, 11, 19, 0]].reshape(1, 2, 2, 8)
  got = np.asarray(inference.nearest_neighbour_scores(features, bank, chunk=6)).reshape(-1)
  bound = 4 * np.sqrt(np.finfo(np.float32).eps) * np.linalg.norm(features.reshape(4, 8), axis=1)
  assert np.all(np.isfinite(got)) and np.all(got <= bound), (got, bound)


def test_split_scores_and_maps_as_pbas_does():
  train, test = _random(5, 6, 4, 4, 8), _random(6, 5, 4, 4, 8)
  scores, maps = inference.nearest_neighbour_split(train, test, 16, sigma=2.0, batch_size=2,
                                                   chunk=30)
  patch = _brute_force(test, train.reshape(-1, 8))
  np.testing.assert_allclose(scores, patch.max(axis=(1, 2)), rtol=1e-5)
  want = inference.anomaly_maps(jnp.asarray(patch, jnp.float32), 16, 2.0)
  assert maps.shape == (5, 16, 16)
  np.testing.assert_allclose(maps, np.asarray(want), rtol=1e-5, atol=1e-5)
  # bfloat16 cached features are scored in float32.
  half = inference.nearest_neighbour_split(jnp.asarray(train, jnp.bfloat16),
                                           jnp.asarray(test, jnp.bfloat16), 16, 2.0)
  assert half[0].dtype == np.float32 and half[0].shape == (5,)


def test_bank_width_must_match():
  with pytest.raises(ValueError, match="bank must be"):
    inference.nearest_neighbour_scores(_random(7, 1, 2, 2, 4), _random(8, 9, 5))
