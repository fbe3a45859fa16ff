"""ABL center bank: initializers (Algorithm 1 and the paper's ablations) and nearest-center lookup.

The bank `c` is `(M, D)`: for the reference's `alignment` method one row per patch position
(`M = H * W`), built once before training with the projector at its initial parameters; every
patch is matched to its nearest row over the whole bank, whatever its position.
"""
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp

METHODS = ("alignment", "average", "iterative", "kmeans")
METRICS = ("cosine", "euclidean")


def check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ValueError(f"model.center_metric={metric!r}: use one of {METRICS}")


def _normalize(x):
  """torch.nn.functional.normalize: x / max(||x||, 1e-12) along the last axis."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest(t: jax.Array, c: jax.Array, metric: str = "cosine") -> tuple[jax.Array, jax.Array]:
  """The row of `c` nearest to each row of `t` (first one on ties, as torch.argmax).

  Args:
    t: `(N, D)` queries.
    c: `(M, D)` center bank.
    metric: `cosine` (highest cosine similarity, the reference) or `euclidean`.

  Returns:
    `idx (N,)` int32 and `c[idx] (N, D)`. No gradient flows into the choice of `idx`.
  """
  check_metric(metric)
  t = jax.lax.stop_gradient(t)
  if metric == "cosine":
    idx = jnp.argmax(_normalize(t) @ _normalize(c).T, axis=1)
  else:
    # ||t - c||^2 up to the per-query constant ||t||^2.
    idx = jnp.argmin(jnp.sum(c * c, axis=1) - 2.0 * (t @ c.T), axis=1)
  return idx, c[idx]


def distance(t: jax.Array, c_near: jax.Array) -> jax.Array:
  """Euclidean distance `(N,)` between matched rows; gradient 0 (not NaN) where they coincide."""
  sq = jnp.sum(jnp.square(t - c_near), axis=-1)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def distance_scores(u: jax.Array, c: jax.Array, metric: str = "cosine") -> jax.Array:
  """ABL-only anomaly score (Table V, row ABL): distance of `u (N, D)` to its nearest center."""
  return distance(u, nearest(u, c, metric)[1])


@jax.jit
def _batch_mean(u):
  """`(B, H, W, D)` -> per-position mean `(H*W, D)`."""
  return u.reshape(u.shape[0], -1, u.shape[-1]).mean(0)


def align(c: jax.Array, m: jax.Array, metric: str, ema: float) -> jax.Array:
  """One alignment update of Algorithm 1 (lines 10-14), as the reference computes it.

  Each row `m_j` of the batch mean is matched to its nearest center row, all matches taken from
  `c` before the update; then, in `j` order, `c[idx_j] = (1 - ema) c[idx_j] + ema m_j`. A row matched
  twice is moved twice, so this is a sequential loop, not a scatter.

  Args:
    c: `(M, D)` bank before the batch.
    m: `(M', D)` per-position mean of the batch.
    metric: matching metric.
    ema: beta, the weight of the new mean.

  Returns:
    The updated `(M, D)` bank.
  """
  idx, _ = nearest(m, c, metric)

  def body(j, c):
    i = idx[j]
    return c.at[i].set((1 - ema) * c[i] + ema * m[j])

  return jax.lax.fori_loop(0, m.shape[0], body, c)


_align = jax.jit(align, static_argnames=("metric",))


def kmeans(x: jax.Array, num_centers: int, metric: str, iters: int, key: jax.Array,
           chunk: int = 4096) -> jax.Array:
  """Lloyd's k-means of `x (N, D)`: `num_centers` rows of `x` drawn from `key`, then `iters` rounds.

  Assignment uses `metric` (the one used for matching during training); an empty cluster keeps its
  previous center. Assignment runs in chunks of `chunk` rows to bound the `(N, M)` similarity.
  """
  n = x.shape[0]
  if n < num_centers:
    raise ValueError(f"model.center_init='kmeans' needs at least {num_centers} training patches, "
                     f"got {n}")
  c0 = x[jax.random.choice(key, n, (num_centers,), replace=False)]

  def round_(c, _):
    idx = jax.lax.map(lambda q: nearest(q[None], c, metric)[0][0], x, batch_size=chunk)
    sums = jax.ops.segment_sum(x, idx, num_segments=num_centers)
    counts = jax.ops.segment_sum(jnp.ones((n,), x.dtype), idx, num_segments=num_centers)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c), None

  return jax.lax.scan(round_, c0, None, length=iters)[0]


_kmeans = jax.jit(kmeans, static_argnames=("num_centers", "metric", "iters", "chunk"))


def init_center(project_fn: Optional[Callable[[jax.Array], jax.Array]],
                batches: Iterable[jax.Array],
                method: str = "alignment",
                metric: str = "cosine",
                ema: float = 0.1,
                key: Optional[jax.Array] = None,
                kmeans_iters: int = 20) -> jax.Array:
  """Builds the center bank `(H*W, D)` in one pass over the training batches, without gradients.

  Every method works in the projected space the loss compares against: `project_fn` (the projector
  at its initial parameters, as in the reference; None = identity) is applied to each batch first.

  Args:
    project_fn: `(..., D) -> (..., D')`, e.g. the frozen initial projector.
    batches: `(B, H, W, D)` arrays in loader order (the reference's loader shuffles; the first batch
      seeds `alignment`/`iterative`).
    method: `alignment` (ABL, Algorithm 1), `average` (per-position mean over the whole training
      set, Eq. 5), `iterative` (per-position EMA of batch means, no matching) or `kmeans`
      (`H*W` k-means centers of all training patches).
    metric: matching metric for `alignment` and `kmeans`.
    ema: beta of the EMA (`alignment`, `iterative`).
    key: PRNG key, needed by `kmeans` only.
    kmeans_iters: Lloyd rounds for `kmeans`.

  Returns:
    `(H*W, D')` float32 center bank.
  """
  if method not in METHODS:
    raise ValueError(f"model.center_init={method!r}: use one of {METHODS}")
  check_metric(metric)
  if method == "kmeans" and key is None:
    raise ValueError("model.center_init='kmeans' needs a PRNG key (init_center(..., key=...))")
  project = jax.jit(project_fn) if project_fn is not None else (lambda x: x)
  projected = (project(jnp.asarray(b, jnp.float32)) for b in batches)

  if method == "kmeans":
    kept = list(projected)
    if not kept:
      raise ValueError("init_center: the training set yielded no batches")
    _, h, w, dim = kept[0].shape
    return _kmeans(jnp.concatenate([u.reshape(-1, dim) for u in kept]), num_centers=h * w,
                   metric=metric, iters=kmeans_iters, key=key)

  c, count = None, 0
  for u in projected:
    m = _batch_mean(u)
    if method == "average":  # accumulate per-position sums, divide once at the end
      c = m * u.shape[0] if c is None else c + m * u.shape[0]
      count += u.shape[0]
    elif c is None:
      c = m
    elif method == "alignment":
      c = _align(c, m, metric=metric, ema=ema)
    else:  # iterative
      c = (1 - ema) * c + ema * m
  if c is None:
    raise ValueError("init_center: the training set yielded no batches")
  return c / count if method == "average" else c
