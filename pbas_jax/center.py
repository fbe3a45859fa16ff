"""ABL center bank: initializers (Algorithm 1 and the paper's ablations) and nearest-center lookup.

The bank `c` is `(M, D)`: for the reference's `alignment` method one row per patch position
(`M = H * W`), built once before training with the projector at its initial parameters; every
patch is matched to its nearest row over the whole bank, whatever its position.
"""
from typing import Callable, Optional

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


def loader_batches(order: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """The reference's loader (`drop_last=False`) over `order (N,)`: full batches and the rest.

  Returns `full (N // batch_size, batch_size)` index rows, in order, and `rest (N % batch_size,)`,
  the last partial batch (empty when `batch_size` divides N). Shapes are static, so a scan runs
  the full batches and the rest is one more call of the same step.
  """
  if batch_size < 1:
    raise ValueError(f"dataset.batch_size={batch_size}: must be >= 1")
  count = order.shape[0] // batch_size
  return order[:count * batch_size].reshape(count, batch_size), order[count * batch_size:]


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


def init_center(project: Optional[Callable[[jax.Array], jax.Array]], features: jax.Array,
                order: jax.Array, batch_size: int, method: str = "alignment",
                metric: str = "cosine", ema: float = 0.1, key: Optional[jax.Array] = None,
                kmeans_iters: int = 20,
                gather: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None
                ) -> jax.Array:
  """Builds the center bank `(H*W, D')` in one pass over the training batches, without gradients.

  A pure, traceable function: the engine jits it once with the projector's parameters as an
  argument (closed over by `project`) and vmaps it over runs. Every method works in the projected
  space the loss compares against: `project` (the projector at its initial parameters, as in the
  reference; None = identity) is applied to each batch first.

  Args:
    project: `(N, D) -> (N, D')`, e.g. the initial projector.
    features: `(N, H, W, D)` cached training features.
    order: `(n,)` the loader's order, indices into `features` (the reference shuffles; the first
      batch seeds `alignment`/`iterative`): every training image once, or a subset of them;
      batches of `batch_size`, the last one partial (`loader_batches`).
    batch_size: images per batch.
    method: `alignment` (ABL, Algorithm 1), `average` (per-position mean over the whole training
      set, Eq. 5), `iterative` (per-position EMA of batch means, no matching) or `kmeans`
      (`H*W` k-means centers of all training patches).
    metric: matching metric for `alignment` and `kmeans`.
    ema: beta of the EMA (`alignment`, `iterative`).
    key: PRNG key, needed by `kmeans` only.
    kmeans_iters: Lloyd rounds for `kmeans`.
    gather: `(features, idx (B,)) -> features[idx]` (default: indexing); the engine passes its
      gather from features split over devices (`sharding.gather_rows`).

  Returns:
    `(H*W, D')` float32 center bank.
  """
  if method not in METHODS:
    raise ValueError(f"model.center_init={method!r}: use one of {METHODS}")
  check_metric(metric)
  if method == "kmeans" and key is None:
    raise ValueError("model.center_init='kmeans' needs a PRNG key (init_center(..., key=...))")
  if order.shape[0] == 0:
    raise ValueError("init_center: the training set is empty")
  project = project or (lambda x: x)
  gather = gather or (lambda features, idx: features[idx])
  n, (_, h, w, dim) = order.shape[0], features.shape

  def projected(idx):  # (B,) -> (B, H*W, D')
    x = jax.lax.stop_gradient(gather(features, idx).astype(jnp.float32)).reshape(-1, dim)
    return project(x).reshape(idx.shape[0], h * w, -1)

  if method == "kmeans":
    u = projected(order)
    return kmeans(u.reshape(n * h * w, -1), h * w, metric, kmeans_iters, key)

  full, rest = loader_batches(order, batch_size)
  if full.shape[0]:
    first, scanned, tail = full[0], full[1:], rest
  else:  # a single, partial batch
    first, scanned, tail = rest, full, rest[:0]

  def update(c, idx):
    u = projected(idx)
    m = u.mean(0)
    if method == "average":  # per-position sums, divided once at the end
      return c + u.sum(0)
    if method == "alignment":
      return align(c, m, metric, ema)
    return (1 - ema) * c + ema * m  # iterative

  u0 = projected(first)
  c = u0.sum(0) if method == "average" else u0.mean(0)
  c = jax.lax.scan(lambda c, idx: (update(c, idx), None), c, scanned)[0]
  if tail.shape[0]:
    c = update(c, tail)
  return c / n if method == "average" else c
