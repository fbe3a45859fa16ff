"""Heatmap panels: colormap, panel layout and content, file names and limits."""
import numpy as np
import pytest
from PIL import Image

from pbas_jax import heatmaps
from pbas_jax.data import preprocess


def test_jet_ends_and_middle():
  np.testing.assert_array_equal(heatmaps.jet(np.array([0.0, 0.5, 1.0])),
                                [[0, 0, 128], [128, 255, 128], [128, 0, 0]])


def test_save_heatmaps_sizes_cap_and_content(tmp_path):
  n, s = 3, 32
  rng = np.random.default_rng(0)
  rgb = rng.random((n, s, s, 3)).astype(np.float32)
  images = (rgb - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD
  masks = np.zeros((n, s, s), np.float32)
  masks[:, 8:16, 8:16] = 1
  maps = rng.random((n, s, s)).astype(np.float32)
  names = ["good/000", "scratch/001", "scratch/002"]
  paths = heatmaps.save_heatmaps(tmp_path, images, masks, maps, names, maps.max(axis=(1, 2)),
                                 limit=2)
  assert [p.rsplit("/", 1)[-1] for p in paths] == ["0000_good_000.png", "0001_scratch_001.png"]
  panel = np.asarray(Image.open(paths[1]))
  gap, caption = 4, 14
  assert panel.shape == (s + caption, 4 * s + 3 * gap, 3)
  # First tile: the un-normalized image; second: the mask in white.
  np.testing.assert_allclose(panel[caption:, :s], rgb[1] * 255, atol=1.0)
  assert (panel[caption + 8:caption + 16, s + gap + 8:s + gap + 16] == 255).all()
  assert (panel[caption:caption + 8, s + gap:2 * s + gap] == 0).all()

  assert len(heatmaps.save_heatmaps(tmp_path / "all", images, None, maps, names, np.zeros(n),
                                    limit=-1)) == 3
  assert heatmaps.save_heatmaps(tmp_path / "none", images, None, maps, names, np.zeros(n),
                                limit=0) == []
  with pytest.raises(ValueError, match="same N images"):
    heatmaps.save_heatmaps(tmp_path, images, None, maps, names[:2], np.zeros(n))
