"""Scores and maps against scipy's gaussian_filter and torch's F.interpolate."""
import importlib.util

import numpy as np
import pytest
import scipy.ndimage

from conftest import require
from pbas_jax import inference


def _scores(shape, seed=0):
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_image_scores_are_max_over_patches():
  s = _scores((3, 4, 5))
  s[1, 2, 3] = 7.0
  out = np.asarray(inference.image_scores(s))
  np.testing.assert_array_equal(out, s.max(axis=(1, 2)))
  assert out[1] == 7.0


@pytest.mark.parametrize("shape,sigma", [((2, 40, 33), 4.0), ((1, 7, 5), 4.0), ((2, 16, 16), 2.5),
                                         ((1, 9, 9), 0.0)])
def test_gaussian_smooth_matches_scipy(shape, sigma):
  # (1, 7, 5) with sigma 4: the 33-tap kernel is wider than the map, so reflection wraps around.
  maps = _scores(shape, seed=1)
  want = np.stack([scipy.ndimage.gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0)
                   for m in maps])
  np.testing.assert_allclose(np.asarray(inference.gaussian_smooth(maps, sigma)), want, atol=1e-5)


def test_upsample_keeps_constants_and_interpolates_half_pixel():
  x = np.array([[[0.0, 1.0]]], np.float32)  # (1, 1, 2) -> (1, 1, 4)
  out = np.asarray(inference.upsample_bilinear(x, (1, 4)))
  # Output centers at input coordinates -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
  np.testing.assert_allclose(out[0, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-7)
  const = np.full((2, 3, 5), 0.7, np.float32)
  np.testing.assert_allclose(np.asarray(inference.upsample_bilinear(const, 17)), 0.7, atol=1e-6)


def test_anomaly_maps_equals_upsample_then_smooth():
  s = _scores((2, 6, 9), seed=2)
  two_step = inference.gaussian_smooth(inference.upsample_bilinear(s, (48, 40)), 4.0)
  out = inference.anomaly_maps(s, (48, 40), 4.0)
  assert out.shape == (2, 48, 40)
  np.testing.assert_allclose(np.asarray(out), np.asarray(two_step), atol=1e-6)
  image, maps = inference.scores_and_maps(s, (48, 40), 4.0)
  np.testing.assert_array_equal(np.asarray(maps), np.asarray(out))
  np.testing.assert_array_equal(np.asarray(image), s.max(axis=(1, 2)))


def test_rejects_wrong_rank():
  with pytest.raises(ValueError, match=r"\(B, h, w\)"):
    inference.anomaly_maps(np.zeros((2, 4, 4, 1), np.float32), 16, 4.0)


@pytest.mark.parity
@pytest.mark.parametrize("in_hw,out_hw", [((36, 36), (288, 288)), ((5, 7), (13, 29)),
                                          ((9, 8), (4, 5))])
def test_upsample_and_maps_match_torch_then_scipy(in_hw, out_hw):
  require(importlib.util.find_spec("torch") is not None,
          "torch missing: pip install -e '.[convert]'")
  import torch  # pylint: disable=g-import-not-at-top
  s = _scores((3, *in_hw), seed=3)
  up = torch.nn.functional.interpolate(torch.from_numpy(s)[:, None], size=out_hw, mode="bilinear",
                                       align_corners=False)[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(inference.upsample_bilinear(s, out_hw)), up, atol=1e-5)
  # The reference pipeline: torch upsampling, then scipy smoothing per map.
  want = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in up])
  np.testing.assert_allclose(np.asarray(inference.anomaly_maps(s, out_hw, 4.0)), want, atol=1e-5)
