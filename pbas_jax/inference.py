"""Scores and maps: patch scores -> image score and pixel anomaly map.

As in the reference code, the image score is the maximum patch score and the pixel map is the
patch-score grid upsampled bilinearly (half-pixel centers, `align_corners=False`, as torch's
`F.interpolate`) to the input size, then smoothed with a Gaussian (scipy `gaussian_filter`
semantics: kernel radius `int(truncate * sigma + 0.5)` with truncate 4, mode 'reflect' =
half-sample symmetric `dcba|abcd`). No normalization.

Both steps are linear and separable, so each axis is one matrix built once per shape in float64
on the host: upsampling `U (H, h)`, smoothing `G (H, H)`. The map is `(G_H U_H) S (G_W U_W)^T`,
two small matmuls per image on the device instead of a 33-tap convolution of the full-size map.

`predict` / `evaluate` score cached features with a trained state over the device mesh: the one
inference path of evaluation during training, the final report and `pbas_jax.predict`.
"""
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pbas_jax import features as features_lib
from pbas_jax import metrics as metrics_lib
from pbas_jax import sharding
from pbas_jax import train

# Kernel extent of scipy.ndimage.gaussian_filter's default.
TRUNCATE = 4.0


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  height, width = size
  return int(height), int(width)


def _readonly(m: np.ndarray) -> np.ndarray:
  m.flags.writeable = False  # cached matrices are shared by every caller
  return m


def _reflect_index(index: np.ndarray, n: int) -> np.ndarray:
  """scipy's mode 'reflect' (half-sample symmetric, period 2n) for any offset."""
  index = np.mod(index, 2 * n)
  return np.where(index >= n, 2 * n - 1 - index, index)


@functools.lru_cache(maxsize=32)
def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
  """(n, n) float64 matrix of scipy's 1-D `gaussian_filter1d(mode='reflect', truncate=4)`."""
  if sigma <= 0:  # scipy skips the axis
    return _readonly(np.eye(n))
  radius = int(TRUNCATE * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1)
  weights = np.exp(-0.5 / (sigma * sigma) * offsets**2)
  weights /= weights.sum()
  rows = np.repeat(np.arange(n), offsets.size)
  cols = _reflect_index(rows + np.tile(offsets, n), n)
  m = np.zeros((n, n))
  np.add.at(m, (rows, cols), np.tile(weights, n))
  return _readonly(m)


def _separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
  """`rows @ x[b] @ cols.T` for every b; x is (B, h, w), rows (H, h), cols (W, w)."""
  if x.ndim != 3:
    raise ValueError(f"expected maps of shape (B, h, w), got {x.shape}")
  x = jnp.asarray(x, jnp.float32)
  # HIGHEST: accelerators otherwise run float32 matmuls in bf16/tf32, far from scipy's 1e-5.
  return jnp.einsum("Hh,bhw,Ww->bHW", jnp.asarray(rows, jnp.float32), x,
                    jnp.asarray(cols, jnp.float32), precision=jax.lax.Precision.HIGHEST)


@jax.jit
def image_scores(patch_scores: jax.Array) -> jax.Array:
  """(B, h, w) patch scores -> (B,) image scores: the maximum over patches."""
  if patch_scores.ndim != 3:
    raise ValueError(f"expected patch scores of shape (B, h, w), got {patch_scores.shape}")
  return jnp.max(patch_scores, axis=(1, 2))


@functools.partial(jax.jit, static_argnames=("size",))
def upsample_bilinear(maps: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """(B, h, w) -> (B, H, W) bilinear resize, half-pixel centers (torch align_corners=False)."""
  height, width = _size_pair(size)
  return _separable(maps, features_lib.bilinear_matrix(height, maps.shape[1]),
                    features_lib.bilinear_matrix(width, maps.shape[2]))


@functools.partial(jax.jit, static_argnames=("sigma",))
def gaussian_smooth(maps: jax.Array, sigma: float) -> jax.Array:
  """(B, H, W) -> (B, H, W) Gaussian smoothing as scipy `gaussian_filter(m, sigma)` per map."""
  return _separable(maps, gaussian_matrix(maps.shape[1], float(sigma)),
                    gaussian_matrix(maps.shape[2], float(sigma)))


@functools.partial(jax.jit, static_argnames=("size", "sigma"))
def anomaly_maps(patch_scores: jax.Array, size: int | tuple[int, int],
                 sigma: float = 4.0) -> jax.Array:
  """(B, h, w) patch scores -> (B, H, W) pixel maps: bilinear upsampling then Gaussian smoothing.

  Equal (to float32 rounding) to `gaussian_smooth(upsample_bilinear(s, size), sigma)`, computed
  through the composed per-axis matrices.
  """
  height, width = _size_pair(size)
  sigma = float(sigma)
  rows = gaussian_matrix(height, sigma) @ features_lib.bilinear_matrix(height, patch_scores.shape[1])
  cols = gaussian_matrix(width, sigma) @ features_lib.bilinear_matrix(width, patch_scores.shape[2])
  return _separable(patch_scores, rows, cols)


def scores_and_maps(patch_scores: jax.Array, size: int | tuple[int, int],
                    sigma: float = 4.0) -> tuple[jax.Array, jax.Array]:
  """(B, h, w) patch scores -> ((B,) image scores, (B, H, W) pixel maps)."""
  return image_scores(patch_scores), anomaly_maps(patch_scores, size, sigma)


# ---------------------------------------------------------------------------------------------
# A trained state on cached features, over the mesh.


@functools.lru_cache(maxsize=8)
def _predictor(scoring: str, metric: str, size: int, sigma: float, mesh: jax.sharding.Mesh):
  """Jitted `(state, features (B, H, W, D)) -> (scores (B,), maps (B, S, S))`, the images split
  over the mesh's devices (`sharding.jit_per_example`)."""
  def predict_batch(state, features):
    return scores_and_maps(train.score_patches(state, features, scoring, metric), size, sigma)

  return sharding.jit_per_example(predict_batch, mesh)


def predict(state: train.TrainState, features, config: ml_collections.ConfigDict,
            mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray]:
  """Image scores (N,) and pixel maps (N, S, S) of features (N, H, W, D), `eval.batch_size` at a
  time (a last partial batch is padded to the full size, so one compilation serves all)."""
  fn = _predictor(config.model.scoring, config.model.center_metric, config.dataset.image_size,
                  float(config.eval.smoothing_sigma), mesh)
  bs, n = config.eval.batch_size, features.shape[0]
  scores, maps = [], []
  for start in range(0, n, bs):
    batch = features[start:start + bs]
    s, m = fn(state, sharding.pad_rows(batch, bs))
    scores.append(sharding.to_host(s)[:len(batch)])
    maps.append(sharding.to_host(m)[:len(batch)])
  return np.concatenate(scores), np.concatenate(maps)


def evaluate(state: train.TrainState, split, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh) -> dict:
  """The five metrics (fractions, None where undefined, plus `notes`) of `state` on a split
  with cached `features`, `labels` and `masks`."""
  scores, maps = predict(state, split.features, config, mesh)
  return metrics_lib.compute_all(scores, split.labels, maps, split.masks, config.eval.pro_variant)


def images_per_second(extractor, state: train.TrainState, images: np.ndarray, batch: int,
                      config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> float:
  """Inference throughput on a batch of `batch` images: backbone, heads and maps, measured on a
  second pass, after compilation. `images` are this process's rows of the batch
  (`sharding.example_rows`; all of them with one process), preprocessed `(B, S, S, 3)`."""
  def run():
    features = extractor(images, global_rows=batch)
    return jax.block_until_ready(predict(state, features, config, mesh))

  run()  # compiles
  t0 = time.perf_counter()
  run()
  return batch / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Yardstick (our addition, not part of PBAS): the simplest detector on the same features.


@functools.partial(jax.jit, static_argnames=("chunk",))
def nearest_neighbour_scores(features: jax.Array, bank: jax.Array, chunk: int = 2048) -> jax.Array:
  """(B, H, W, D) patch features -> (B, H, W) Euclidean distance to the nearest row of `bank`.

  `bank` (M, D) is read in chunks of `chunk` rows (the last chunk ends at row M, overlapping the
  one before it; the minimum does not mind), so the working set is (B*H*W, chunk) distances
  whatever M is. Squared distances come from ||b||^2 - 2 a.b + ||a||^2, clamped at 0 against
  rounding before the square root: a distance is exact to float32 rounding of those terms, so a
  near-duplicate of a bank row scores up to about sqrt(eps) ||a|| (~3e-4 ||a||) instead of 0.
  """
  b, h, w, dim = features.shape
  if bank.ndim != 2 or bank.shape[1] != dim:
    raise ValueError(f"bank must be (M, {dim}) to match the features {features.shape}, got "
                     f"{bank.shape}")
  a = features.reshape(-1, dim).astype(jnp.float32)
  bank = jnp.asarray(bank, jnp.float32)
  chunk = min(chunk, bank.shape[0])
  starts = jnp.minimum(jnp.arange(-(-bank.shape[0] // chunk)) * chunk, bank.shape[0] - chunk)

  def nearest(best, start):
    rows = jax.lax.dynamic_slice_in_dim(bank, start, chunk)
    # HIGHEST: accelerators otherwise multiply float32 in bf16/tf32 (see _separable).
    d2 = jnp.sum(rows * rows, axis=1) - 2 * jnp.matmul(a, rows.T,
                                                       precision=jax.lax.Precision.HIGHEST)
    return jnp.minimum(best, jnp.min(d2, axis=1)), None

  best, _ = jax.lax.scan(nearest, jnp.full(a.shape[0], jnp.inf, jnp.float32), starts)
  d2 = jnp.maximum(best + jnp.sum(a * a, axis=1), 0.0)
  return jnp.sqrt(d2).reshape(b, h, w)


def nearest_neighbour_split(train_features, test_features, size: int | tuple[int, int],
                            sigma: float = 4.0, batch_size: int = 16, chunk: int = 2048
                            ) -> tuple[np.ndarray, np.ndarray]:
  """Scores a test split by the distance to a memory bank of every training patch.

  Args:
    train_features: (N, H, W, D) cached training features; all N*H*W patches form the bank.
    test_features: (T, H, W, D) cached test features (host or device, any float dtype).
    size, sigma: as `scores_and_maps` (the PBAS maps: bilinear upsampling, Gaussian smoothing).
    batch_size: test images scored per call; with `chunk` it bounds the working set.
    chunk: bank rows per step of `nearest_neighbour_scores`.

  Returns:
    Image scores (T,) (the maximum patch distance) and pixel maps (T, S, S), as numpy arrays,
    ready for `metrics.compute_all`.
  """
  bank = jnp.asarray(train_features, jnp.float32).reshape(-1, train_features.shape[-1])
  scores, maps = [], []
  for start in range(0, test_features.shape[0], batch_size):
    patch = nearest_neighbour_scores(jnp.asarray(test_features[start:start + batch_size]), bank,
                                     chunk)
    s, m = scores_and_maps(patch, size, sigma)
    scores.append(np.asarray(s))
    maps.append(np.asarray(m))
  return np.concatenate(scores), np.concatenate(maps)
