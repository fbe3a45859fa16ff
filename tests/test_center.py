"""Center bank: nearest lookup, the sequential alignment rule, the ablation initializers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pbas_jax import center


def _np_nearest(t, c, metric):
  if metric == "cosine":
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    return np.argmax(tn @ cn.T, axis=1)
  return np.argmin(((t[:, None] - c[None]) ** 2).sum(-1), axis=1)


def _np_align(c, m, ema):
  """The reference's loop: matches from c before the batch, then sequential in-place updates."""
  c = c.astype(np.float64).copy()
  idx = _np_nearest(m, c, "cosine")
  for j, i in enumerate(idx):
    c[i] = c[i] * (1 - ema) + m[j] * ema
  return c


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_matches_numpy(metric):
  rng = np.random.default_rng(0)
  t = rng.normal(size=(50, 6)).astype(np.float32)
  c = (rng.normal(size=(9, 6)) * rng.uniform(0.5, 3, size=(9, 1))).astype(np.float32)
  idx, c_near = center.nearest(t, c, metric)
  np.testing.assert_array_equal(idx, _np_nearest(t, c, metric))
  np.testing.assert_array_equal(c_near, c[idx])


def test_nearest_cosine_ignores_norm_and_takes_first_tie():
  c = jnp.array([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0]])
  idx, _ = center.nearest(jnp.array([[5.0, 0.1], [0.1, 5.0]]), c, "cosine")
  np.testing.assert_array_equal(idx, [0, 2])  # rows 0 and 1 tie: first wins (torch.argmax)
  idx, _ = center.nearest(jnp.array([[9.0, 0.0]]), c, "euclidean")
  np.testing.assert_array_equal(idx, [1])


def test_distance_scores():
  c = jnp.array([[0.0, 0.0], [10.0, 0.0]])
  u = jnp.array([[3.0, 4.0], [10.0, -1.0]])
  np.testing.assert_allclose(center.distance_scores(u, c, "euclidean"), [5.0, 1.0], rtol=1e-6)


def test_align_row_matched_twice_is_updated_twice():
  c = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
  m = np.array([[2.0, 0.2], [3.0, -0.3], [0.0, 2.0]], np.float32)  # rows 0 and 1 both -> center 0
  out = center.align(jnp.asarray(c), jnp.asarray(m), "cosine", 0.1)
  expected = _np_align(c, m, 0.1)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  # The sequential rule differs from a one-shot scatter (last write wins) on this input.
  scatter = c.copy()
  scatter[[0, 0, 1]] = 0.9 * c[[0, 0, 1]] + 0.1 * m
  assert not np.allclose(expected, scatter)
  # Matches come from c before the batch: center 2 is never touched.
  np.testing.assert_array_equal(out[2], c[2])


def _init(project, batches, *args, **kwargs):
  """`init_center` over `batches` (full ones then a partial one) as one array in loader order."""
  features = jnp.asarray(np.concatenate(batches)) if batches else jnp.zeros((0, 2, 2, 3))
  size = len(batches[0]) if batches else 1
  return center.init_center(project, features, jnp.arange(len(features)), size, *args, **kwargs)


def test_init_center_alignment_equals_reference_loop():
  rng = np.random.default_rng(1)
  batches = [rng.normal(size=(b, 3, 3, 4)).astype(np.float32) + rng.normal(size=(3, 3, 4))
             for b in (4, 4, 3)]
  w = rng.normal(size=(4, 4)).astype(np.float32)
  project = lambda x: x @ w
  out = _init(project, batches, "alignment", "cosine", 0.1)
  expected = None
  for b in batches:
    m = (b @ w).reshape(b.shape[0], -1, 4).mean(0).astype(np.float64)
    expected = m if expected is None else _np_align(expected, m, 0.1)
  assert out.shape == (9, 4)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_init_center_average_and_iterative():
  rng = np.random.default_rng(2)
  batches = [rng.normal(size=(b, 2, 2, 3)).astype(np.float32) for b in (3, 3, 1)]
  every = np.concatenate(batches).astype(np.float64)
  out = _init(None, batches, "average")
  np.testing.assert_allclose(out, every.reshape(7, 4, 3).mean(0), rtol=1e-5, atol=1e-6)
  ema = 0.1
  expected = batches[0].reshape(3, 4, 3).mean(0)
  for b in batches[1:]:
    expected = (1 - ema) * expected + ema * b.reshape(len(b), 4, 3).mean(0)
  np.testing.assert_allclose(_init(None, batches, "iterative", ema=ema), expected,
                             rtol=1e-5, atol=1e-6)


def test_init_center_kmeans_finds_separated_clusters():
  rng = np.random.default_rng(3)
  means = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10], [-10, 0, 0]], np.float32)
  patches = means[rng.integers(0, 4, size=(16, 2, 2))] + rng.normal(size=(16, 2, 2, 3)) * 0.1
  batches = [patches[i:i + 4].astype(np.float32) for i in range(0, 16, 4)]
  key = jax.random.key(0)
  out = np.asarray(_init(None, batches, "kmeans", "euclidean", key=key, kmeans_iters=10))
  assert out.shape == (4, 3)
  # Each true mean has exactly one center within the noise level.
  dists = np.linalg.norm(out[:, None] - means[None], axis=-1)
  np.testing.assert_array_equal(np.sort(dists.argmin(0)), np.arange(4))
  assert dists.min(0).max() < 0.2
  again = _init(None, batches, "kmeans", "euclidean", key=key, kmeans_iters=10)
  np.testing.assert_array_equal(out, again)


def test_init_center_errors_name_the_setting():
  batches = [np.zeros((1, 2, 2, 3), np.float32)]
  with pytest.raises(ValueError, match="model.center_init"):
    _init(None, batches, "median")
  with pytest.raises(ValueError, match="model.center_metric"):
    _init(None, batches, "alignment", "manhattan")
  with pytest.raises(ValueError, match="PRNG key"):
    _init(None, batches, "kmeans")
  with pytest.raises(ValueError, match="training set is empty"):
    _init(None, [], "alignment")


def test_init_center_compiles_once_for_any_projector_parameters():
  """The projector's parameters are an argument of the compiled function, not constants."""
  rng = np.random.default_rng(4)
  features = jnp.asarray(rng.normal(size=(6, 2, 2, 3)).astype(np.float32))
  traces = []

  def build(w):
    traces.append(1)
    return center.init_center(lambda x: x @ w, features, jnp.arange(6), 4)

  build = jax.jit(build)
  for seed in range(3):
    w = jnp.asarray(np.random.default_rng(seed).normal(size=(3, 3)).astype(np.float32))
    out = build(w)
    np.testing.assert_allclose(out, _init(lambda x: x @ w, [features[:4], features[4:]]),
                               rtol=1e-6)
  assert len(traces) == 1
