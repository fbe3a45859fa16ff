"""Patch features (paper Eq. 1-4): backbone maps -> one D-dim vector per patch position.

The authors' code (PatchCore's PatchMaker, Preprocessing and Aggregator) does, per layer l:
  1. unfold: zero-padded p x p neighbourhood, stride 1 -> C_l*p*p values per position, ordered
     (channel, ky, kx) like torch.nn.Unfold;
  2. layers after the first: bilinear resize (half-pixel centers, align_corners=False, no
     antialias) to the first layer's grid;
  3. adaptive average pooling (torch adaptive_avg_pool1d) of the C_l*p*p vector to `pretrain_dim`;
then stacks the L pooled vectors, flattens them layer-major and pools again to `target_dim`.

Unfold and both poolings act on the channel axis and are linear, so per layer they compose into one
fixed sparse matrix K_l (target_dim x C_l*p*p), and the resize (spatial axes) commutes with it. We
therefore compute z_l = K_l . unfold(x_l) at the layer's own resolution (only the output rows
layer l reaches), resize z_l, and add the layers. K_l repeats one small block along its diagonal
(pooling windows are translation invariant), so z_l is a handful of shifted, weighted sums of
channels: no C*p*p unfold is ever materialized. For wide_resnet50_2 layer2+layer3 at 1536 this is
mean-of-6 / mean-of-12 windows over the (channel, ky, kx) axis, 768 + 768 outputs. The result
equals the reference order up to float rounding (tests/test_features.py checks it against torch).
"""
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from pbas_jax import backbones
from pbas_jax import sharding

# Above this many nonzeros in K_l's repeated block, the sum of shifted channels compiles slowly
# (seconds per hundred terms) and a grouped convolution takes over. Only sizes without a common
# period get there (e.g. target_dim 1000 with 1024 channels); the published ones need 18 and 36.
_MAX_TERMS = 512


def pool_matrix(n: int, size: int) -> scipy.sparse.csr_matrix:
  """torch adaptive_avg_pool1d from n to `size` values as a sparse (size, n) float64 matrix.

  Output i averages inputs floor(i*n/size) .. ceil((i+1)*n/size) - 1.
  """
  i = np.arange(size)
  start, end = i * n // size, -(-(i + 1) * n // size)
  rows = np.repeat(i, end - start)
  cols = np.concatenate([np.arange(s, e) for s, e in zip(start, end)])
  return scipy.sparse.csr_matrix((1.0 / (end - start)[rows], (rows, cols)), shape=(size, n))


def _repeated_block(kernel: scipy.sparse.coo_matrix, channels: int
                    ) -> tuple[int, np.ndarray]:
  """The largest G such that `kernel` (R, channels*p*p) is G copies of one block on its diagonal.

  Returns G and the block (R/G, channels/G*p*p); G = 1 is the whole kernel.
  """
  r, n = kernel.shape
  g_max = math.gcd(r, channels)
  for groups in sorted((g for g in range(2, g_max + 1) if g_max % g == 0), reverse=True):
    q, m = r // groups, n // groups
    first = kernel.row < q
    if (not np.array_equal(kernel.row // q, kernel.col // m)
        or kernel.nnz != groups * first.sum()):
      continue
    block = np.zeros((q, m))
    block[kernel.row[first], kernel.col[first]] = kernel.data[first]
    if np.allclose(block[kernel.row % q, kernel.col % m], kernel.data, rtol=1e-12, atol=0):
      return groups, block
  return 1, kernel.toarray()


@functools.lru_cache(maxsize=64)
def _layer_kernels(channels: tuple[int, ...], patch_size: int, pretrain_dim: int,
                   target_dim: int) -> tuple[tuple[int, int, int, np.ndarray], ...]:
  """Per layer: output rows [o0, o1) it reaches, groups G, repeated block of K_l (see module doc)."""
  stack_pool = pool_matrix(len(channels) * pretrain_dim, target_dim).tocsc()
  plans = []
  for layer, c in enumerate(channels):
    kernel = stack_pool[:, layer * pretrain_dim:(layer + 1) * pretrain_dim] @ pool_matrix(
        c * patch_size**2, pretrain_dim)
    kernel = kernel.tocoo()
    o0, o1 = kernel.row.min(), kernel.row.max() + 1
    kernel = scipy.sparse.coo_matrix((kernel.data, (kernel.row - o0, kernel.col)),
                                     shape=(o1 - o0, kernel.shape[1]))
    plans.append((int(o0), int(o1), *_repeated_block(kernel, c)))
  return tuple(plans)


def _pooled_unfold(x: jnp.ndarray, patch_size: int, groups: int, block: np.ndarray
                   ) -> jnp.ndarray:
  """K . unfold(x) for K = `groups` copies of `block`: (B, h, w, C) -> (B, h', w', groups*q).

  Unfold is torch's Unfold(p, padding=(p-1)//2, stride=1): h' = h for odd p, h - 1 for even p.
  """
  p = patch_size
  pad = (p - 1) // 2
  b, h, w, c = x.shape
  out_h, out_w = h + 2 * pad - p + 1, w + 2 * pad - p + 1
  q, c_in = block.shape[0], c // groups
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows, cols = np.nonzero(block)
  if len(rows) > _MAX_TERMS:
    kernel = np.tile(block.reshape(q, c_in, p, p).transpose(2, 3, 1, 0), (1, 1, 1, groups))
    return jax.lax.conv_general_dilated(
        x, jnp.asarray(kernel, jnp.float32), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST)
  x = x.reshape(b, h + 2 * pad, w + 2 * pad, groups, c_in)
  outputs = [0.0] * q
  for j, col in zip(rows, cols):  # out[..., g, j] += block[j, (ch, ky, kx)] * x[shifted, g, ch]
    ch, ky, kx = np.unravel_index(col, (c_in, p, p))
    outputs[j] = outputs[j] + x[:, ky:ky + out_h, kx:kx + out_w, :, ch] * np.float32(block[j, col])
  return jnp.stack(outputs, axis=-1).reshape(b, out_h, out_w, groups * q)


@functools.lru_cache(maxsize=32)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix of torch's 1-D bilinear resize, align_corners=False.

  Source coordinate (i + 0.5) * in / out - 0.5, clamped at 0, linear between its two neighbours
  (the last one repeated at the far border). Shared by the layer upsampling here and the anomaly
  maps (`inference`); read-only, as callers share the cached matrix.
  """
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  m.flags.writeable = False
  return m


def resize_bilinear(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """torch interpolate(mode="bilinear", align_corners=False), no antialias, NHWC.

  (B, h, w, C) -> (B, height, width, C), one `bilinear_matrix` product per axis.
  """
  rows = jnp.asarray(bilinear_matrix(height, x.shape[1]), x.dtype)
  cols = jnp.asarray(bilinear_matrix(width, x.shape[2]), x.dtype)
  return jnp.einsum("Hh,bhwc,Ww->bHWc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)


def patch_features(maps: Sequence[jnp.ndarray], patch_size: int = 3, pretrain_dim: int = 1536,
                   target_dim: int = 1536) -> jnp.ndarray:
  """Backbone feature maps -> patch features on the first map's grid.

  Args:
    maps: L feature maps (B, h_l, w_l, C_l); the first one sets the output grid.
    patch_size: p of the p x p neighbourhood (paper: 3).
    pretrain_dim: per-layer pooled size (reference: 1536).
    target_dim: final size D (reference: 1536).

  Returns:
    (B, H, W, D) float32; (H, W) is the first map's grid (H = h_0 - 1 for even p, as torch).
  """
  plans = _layer_kernels(tuple(x.shape[-1] for x in maps), patch_size, pretrain_dim, target_dim)
  out = None
  for x, (o0, o1, groups, block) in zip(maps, plans):
    z = _pooled_unfold(x.astype(jnp.float32), patch_size, groups, block)
    if out is not None:
      z = resize_bilinear(z, out.shape[1], out.shape[2])
    z = jnp.pad(z, ((0, 0), (0, 0), (0, 0), (o0, target_dim - o1)))  # rows layer l reaches
    out = z if out is None else out + z
  return out


@functools.cache
def _compiler_options() -> dict[str, str]:
  """XLA options for the extractor: on CPU, convolutions through Eigen rather than YNNPACK.

  Measured on 2 shared cores (benchmarks/backbone.py, wide_resnet50_2, batch 8 at 288): 1.6 s
  instead of 2.0 s per batch, same results to float rounding. An XLA without the option (older
  jaxlib) or another backend compiles with its defaults.
  """
  if jax.default_backend() != "cpu":
    return {}
  options = {"xla_cpu_experimental_ynn_fusion_type": ""}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
  except (TypeError, jax.errors.JaxRuntimeError):
    return {}
  return options


def make_extractor(name: str, variables, layers: Sequence[str], patch_size: int,
                   pretrain_dim: int, target_dim: int, mesh: jax.sharding.Mesh
                   ) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Jitted backbone + patch features: images (B, S, S, 3) -> (B, H, W, D) float32.

  Args:
    name: backbone name (`backbones.names()`).
    variables: its variables, e.g. `backbones.load_variables(name, weights)`; only the stages up
      to the deepest of `layers` are kept (and put on the default device once).
    layers: backbone levels, the first one setting the output grid (e.g. ("layer2", "layer3")).
    patch_size, pretrain_dim, target_dim: as `patch_features`.
    mesh: the variables are replicated on its devices and the images split over them
      (`sharding.jit_per_example`: any batch size, padded to a multiple of the device count).
  """
  module = backbones.create(name, layers)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  kept = {collection: {key: variables[collection][key] for key in tree}
          for collection, tree in shapes.items()}

  def extract(variables, images):
    return patch_features(module.apply(variables, images), patch_size, pretrain_dim, target_dim)

  return functools.partial(
      sharding.jit_per_example(extract, mesh, compiler_options=_compiler_options()),
      sharding.put(kept, sharding.replicated(mesh)))


def feature_shape(config) -> tuple[int, int, int]:
  """`(H, W, D)` of the configured backbone's patch features (shapes only, nothing computed)."""
  b, size = config.backbone, config.dataset.image_size
  module = backbones.create(b.name, tuple(b.layers))
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), images)
  out = jax.eval_shape(lambda v, x: patch_features(module.apply(v, x), b.patch_size,
                                                   b.pretrain_dim, b.target_dim), variables, images)
  return tuple(out.shape[1:])


def extractor_of(config, mesh: jax.sharding.Mesh) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """`make_extractor` for the configured backbone (`backbone.*`), weights loaded or converted."""
  b = config.backbone
  variables = backbones.load_variables(b.name, b.weights, seed=b.seed,
                                       cache_dir=b.cache_dir or None)
  return make_extractor(b.name, variables, tuple(b.layers), b.patch_size, b.pretrain_dim,
                        b.target_dim, mesh=mesh)
