"""Patch features against the authors' order of torch ops (Unfold, interpolate, adaptive pools)."""
import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

from conftest import require
from pbas_jax import backbones
from pbas_jax import features
from pbas_jax import sharding

# benchmarks/torch_reference.py: the authors' torch computations, shared with the benchmarks.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(name="torch")
def _torch():
  require(importlib.util.find_spec("torch") is not None, "torch missing: install the convert extra")
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def reference_patch_features(torch, maps, patch_size, pretrain_dim, target_dim):
  """The authors' PatchMaker.patchify, upsampling loop, Preprocessing and Aggregator on NHWC maps."""
  import torch_reference  # pylint: disable=g-import-not-at-top  (needs torch)
  nchw = [torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2) for x in maps]
  return torch_reference.patch_features(nchw, patch_size, pretrain_dim, target_dim).numpy()


def _maps(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


@pytest.mark.parity
@pytest.mark.parametrize("shapes, patch_size, pretrain_dim, target_dim", [
    # wide_resnet50_2 layer2 + layer3 at 288 and 256, the published setting.
    ([(2, 36, 36, 512), (2, 18, 18, 1024)], 3, 1536, 1536),
    ([(1, 32, 32, 512), (1, 16, 16, 1024)], 3, 1536, 1536),
    # resnet18 channels at 280 (18 -> 35 is not an integer ratio), target_dim not dividing:
    # layer2 as a sum of shifted channels, layer3 as a grouped convolution (see below).
    ([(1, 35, 35, 128), (1, 18, 18, 256)], 3, 1536, 1000),
    # three layers, even patch size, no pooling size divides (grouped convolutions).
    ([(1, 16, 16, 32), (1, 8, 8, 64), (1, 4, 4, 128)], 4, 300, 200),
    # unit patch, pooling up (C*p*p < pretrain_dim < target_dim).
    ([(1, 12, 12, 64), (1, 6, 6, 96)], 1, 80, 130),
])
def test_patch_features_match_torch_reference(torch, shapes, patch_size, pretrain_dim, target_dim):
  maps = _maps(shapes)
  got = jax.jit(features.patch_features, static_argnums=(1, 2, 3))(
      maps, patch_size, pretrain_dim, target_dim)
  want = reference_patch_features(torch, maps, patch_size, pretrain_dim, target_dim)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_both_kernel_paths_are_exercised():
  # pylint: disable=protected-access
  # The wrn case sums 9 / 18 shifted channels per output group; the 1000-dim case above takes
  # one path per layer.
  plans = features._layer_kernels((512, 1024), 3, 1536, 1536)
  assert [(o0, o1, groups, np.count_nonzero(block)) for o0, o1, groups, block in plans] == [
      (0, 768, 256, 18), (768, 1536, 256, 36)]
  plans = features._layer_kernels((128, 256), 3, 1536, 1000)
  assert [np.count_nonzero(block) > features._MAX_TERMS for *_, block in plans] == [False, True]


@pytest.mark.parity
@pytest.mark.parametrize("size", [(36, 36), (35, 29), (7, 5)])
def test_resize_bilinear_matches_torch_interpolate(torch, size):
  (x,) = _maps([(2, 18, 13, 3)])
  want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bilinear",
                       align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(features.resize_bilinear(x, *size)), want,
                             rtol=0, atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("n, size", [(4608, 1536), (9216, 1536), (1152, 1536), (2304, 1000)])
def test_pool_matrix_matches_adaptive_avg_pool1d(torch, n, size):
  (x,) = _maps([(3, n)])
  want = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(x)[:, None], size)[:, 0].numpy()
  np.testing.assert_allclose(x @ features.pool_matrix(n, size).T.toarray(), want,
                             rtol=0, atol=1e-6)


def test_extractor_composes_backbone_and_patch_features():
  name, layers = "resnet18", ("layer1", "layer2")
  variables = backbones.init_variables(name, seed=0)
  images = _maps([(2, 32, 32, 3)])[0]
  extract = features.make_extractor(name, variables, layers, 3, 96, 64,
                                    mesh=sharding.make_mesh(jax.devices()[:1]))
  maps = jax.jit(backbones.create(name, layers).apply)(variables, images)
  want = features.patch_features(maps, 3, 96, 64)
  got = extract(images)
  assert got.shape == (2, 8, 8, 64) and got.dtype == np.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
