"""The trainable heads: projector P (ABL) and discriminator D (RBO).

Both start from the reference's initial distributions (torch `xavier_normal_` weights, torch-default
biases) so that a run is statistically the same as the authors', and so that torch parity tests can
load the same numbers. Inputs are flat patch features `(N, D)`.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.init.xavier_normal_: an untruncated normal, std sqrt(2 / (fan_in + fan_out)).
# (jax.nn.initializers.glorot_normal is truncated, hence the explicit "normal".)
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")

BN_MOMENTUM = 0.1  # torch convention: weight of the new batch statistic
BN_EPS = 1e-5
LEAKY_SLOPE = 0.2


def matmul(a: jax.Array, b: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """`a @ b` with operands in `dtype` and float32 accumulation and result.

  `train.compute_dtype`: float32 (the reference) is the plain product; bfloat16 rounds the operands
  only, so parameters, sums and everything downstream stay float32.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return a @ b
  return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def torch_bias_init(fan_in: int):
  """torch.nn.Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def ray_pair_dense(t, center, idx, scale, kernel, bias, dtype=jnp.float32):
  """One Linear layer applied to the AFS pair `[t; f]`, `f = t + scale * (t - center[idx])`.

  The offset of `f` is a constant (Eq. 7 stops its gradient). Because `f` is affine in `t` and in
  the center rows, `f @ W = (1 + s) t @ W - s (center @ W)[idx]`: the `N`-row matmul is done once
  for both halves and the center term costs `M` rows, not `N`. The backward pass uses the same
  identity, with the gradient into `t` being `(g_t + g_f) @ W.T` (one matmul; none through the
  offset).

  Args:
    t: `(N, D)` normal features.
    center: `(M, D)` center bank.
    idx: `(N,)` int, row of `center` nearest to each `t`.
    scale: `(N,)` length of the offset over the length of `t - center[idx]` (`k r / d`).
    kernel: `(D, F)`.
    bias: `(F,)`.
    dtype: operand dtype of the matmuls (`matmul`).

  Returns:
    `(2N, F)`: the layer's outputs for `t` then for `f`.
  """
  return _ray_pair_dense_fwd(t, center, idx, scale, kernel, bias, dtype)[0]


def _ray_pair_dense_fwd(t, center, idx, scale, kernel, bias, dtype=jnp.float32):
  h_t = matmul(t, kernel, dtype)
  h_c = matmul(center, kernel, dtype)
  s = scale[:, None]
  h_f = h_t + s * (h_t - h_c[idx])
  out = jnp.concatenate([h_t, h_f]) + bias
  return out, (t, center, idx, scale, kernel)


def _ray_pair_dense_bwd(dtype, res, g):
  t, center, idx, scale, kernel = res
  n = t.shape[0]
  g_t, g_f = g[:n], g[n:]
  s = scale[:, None]
  # dW = t^T g_t + f^T g_f with f = (1 + s) t - s c[idx].
  sg_f = s * g_f
  g_c = jax.ops.segment_sum(sg_f, idx, num_segments=center.shape[0])
  d_kernel = matmul(t.T, g_t + g_f + sg_f, dtype) - matmul(center.T, g_c, dtype)
  d_t = matmul(g_t + g_f, kernel.T, dtype)
  d_bias = g.sum(0)
  return d_t, jnp.zeros_like(center), None, jnp.zeros_like(scale), d_kernel, d_bias


ray_pair_dense.defvjp(_ray_pair_dense_fwd, _ray_pair_dense_bwd)


class Linear(nn.Module):
  """torch.nn.Linear with the reference's init; optionally applied to an AFS pair.

  Attributes:
    features: output width.
    use_bias: whether to add a bias (the discriminator's tail has none).
    dtype: operand dtype of the matmul (`matmul`); parameters are always float32.
  """
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, ray=None):
    """`x (N, D)` -> `(N, F)`; with `ray=(center, idx, scale)` -> `(2N, F)` (see `ray_pair_dense`)."""
    fan_in = x.shape[-1]
    kernel = self.param("kernel", xavier_normal, (fan_in, self.features))
    bias = (self.param("bias", torch_bias_init(fan_in), (self.features,)) if self.use_bias
            else jnp.zeros((self.features,), x.dtype))
    if ray is not None:
      return ray_pair_dense(x, *ray, kernel, bias, self.dtype)
    return matmul(x, kernel, self.dtype) + bias


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm1d: biased batch variance to normalize, unbiased one in `running_var`.

  Train mode normalizes with the statistics of the batch and moves the running statistics by
  `BN_MOMENTUM` (torch's convention); eval mode uses the running statistics. Flax's BatchNorm
  keeps the biased variance, which would not match the reference's running stats.
  """

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if train:
      n = x.shape[0]
      mean = x.mean(0)
      var = jnp.square(x - mean).mean(0)
      if not self.is_initializing():
        ra_mean.value = (1 - BN_MOMENTUM) * ra_mean.value + BN_MOMENTUM * mean
        ra_var.value = (1 - BN_MOMENTUM) * ra_var.value + BN_MOMENTUM * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    return (x - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias


class Projector(nn.Module):
  """P: `num_layers` Linear layers of equal width (the reference's `Projection`, layer_type 0).

  The reference only puts LeakyReLU between layers for `layer_type > 1`, which its runs never set,
  so a deeper projector is a stack of plain Linear layers.

  Attributes:
    num_layers: number of Linear layers (the published runs use 1).
    features: output width; None keeps the input width.
    dtype: operand dtype of the matmuls (`train.compute_dtype`).
  """
  num_layers: int = 1
  features: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """`x (N, D)` -> `(N, features or D)`."""
    width = self.features or x.shape[-1]
    for i in range(self.num_layers):
      x = Linear(width, dtype=self.dtype, name=f"layer{i}")(x)
    return x


class Discriminator(nn.Module):
  """D: (Linear-BatchNorm-LeakyReLU(0.2)) x (num_layers - 1), then a bias-free Linear(hidden, 1).

  Returns logits; the reference's Sigmoid is applied by the losses (stably) and by scoring.

  Attributes:
    hidden: width of every hidden block.
    num_layers: hidden blocks + 1 (the published runs use 2).
    dtype: operand dtype of the matmuls (`train.compute_dtype`).
  """
  hidden: int = 1024
  num_layers: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, ray=None):
    """Logits `(N,)` of `x (N, D)`, or `(2N,)` of the AFS pair `[x; f]` when `ray` is given.

    With `ray=(center, idx, scale)` the batch is `[x; x + scale * (x - center[idx])]` with a
    constant offset, as `ray_pair_dense` computes it; BatchNorm statistics span both halves.
    """
    if self.num_layers < 2:
      raise ValueError(f"model.disc_layers={self.num_layers}: the discriminator needs at least one "
                       "hidden block; set model.disc_layers >= 2")
    for i in range(self.num_layers - 1):
      x = Linear(self.hidden, dtype=self.dtype, name=f"block{i}_linear")(
          x, ray=ray if i == 0 else None)
      x = BatchNorm(name=f"block{i}_bn")(x, train)
      x = nn.leaky_relu(x, LEAKY_SLOPE)
    return Linear(1, use_bias=False, dtype=self.dtype, name="tail")(x)[:, 0]
