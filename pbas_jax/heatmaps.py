"""Heatmap panels: image | ground truth | anomaly map | overlay, as PNG files.

Images arrive ImageNet-normalized (as the backbone sees them) and are shown un-normalized; one
value range is shared by every panel of a call, so colours compare across images.
"""
import io
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pbas_jax import fileio
from pbas_jax.data import preprocess


def jet(x: np.ndarray) -> np.ndarray:
  """(...) values in [0, 1] -> (..., 3) uint8 RGB of the 'jet' colormap (blue -> red)."""
  x = np.clip(np.asarray(x, np.float32), 0.0, 1.0)[..., None]
  rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0], np.float32)), 0.0, 1.0)
  return (255 * rgb + 0.5).astype(np.uint8)


def denormalize(image: np.ndarray) -> np.ndarray:
  """(S, S, 3) ImageNet-normalized image -> (S, S, 3) uint8 RGB."""
  rgb = np.asarray(image, np.float32) * preprocess.IMAGENET_STD + preprocess.IMAGENET_MEAN
  return (255 * np.clip(rgb, 0.0, 1.0) + 0.5).astype(np.uint8)


_GAP = 4       # white pixels between tiles
_CAPTION = 14  # caption strip height


def heatmap_panel(image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray,
                  value_range: tuple[float, float], caption: str) -> Image.Image:
  """One panel: image | ground truth | heatmap | overlay, with a caption strip on top.

  Args:
    image: (S, S, 3) ImageNet-normalized image.
    mask: (S, S) ground truth (`== 1` anomalous), or None (a gray tile).
    amap: (S, S) anomaly map.
    value_range: map values shown as the colormap's ends (shared across panels).
    caption: text of the caption strip.

  Returns:
    An RGB image of size (4 S + 3 gaps) x (S + caption).
  """
  rgb = denormalize(image)
  size = rgb.shape[:2]
  if mask is None:
    gt = np.full((*size, 3), 128, np.uint8)
  else:
    gt = np.repeat(((np.asarray(mask) == 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
  lo, hi = value_range
  heat = jet((np.asarray(amap, np.float32) - lo) / max(hi - lo, 1e-12))
  overlay = (0.5 * rgb + 0.5 * heat + 0.5).astype(np.uint8)
  tiles = [rgb, gt, heat, overlay]
  panel = Image.new("RGB", (4 * size[1] + 3 * _GAP, size[0] + _CAPTION), "white")
  for i, tile in enumerate(tiles):
    panel.paste(Image.fromarray(tile), (i * (size[1] + _GAP), _CAPTION))
  draw = ImageDraw.Draw(panel)
  draw.text((2, 1), caption, fill="black")
  if mask is None:
    draw.text((size[1] + _GAP + 2, _CAPTION + 2), "no mask", fill="white")
  return panel


def save_heatmaps(directory: str | os.PathLike, images, masks, maps, names: Sequence[str],
                  scores, limit: int = 20,
                  value_range: tuple[float, float] | None = None) -> list[str]:
  """Writes heatmap panels (image | ground truth | heatmap | overlay) as PNG files.

  Args:
    directory: output folder (created).
    images: (N, S, S, 3) ImageNet-normalized test images.
    masks: (N, S, S) ground truth, or None.
    maps: (N, S, S) anomaly maps.
    names: N image names (e.g. "scratch/003"), used in the file names and captions.
    scores: (N,) image scores, shown in the captions.
    limit: at most this many panels, the first ones (0 = none, -1 = all).
    value_range: map values at the colormap's ends; default: min and max over all `maps`, so
      colors compare across panels.

  Returns:
    The paths written.
  """
  maps = np.asarray(maps)
  images = np.asarray(images)
  n = len(maps)
  if images.shape[:3] != maps.shape or len(names) != n or len(np.ravel(scores)) != n:
    raise ValueError(f"save_heatmaps: images {images.shape}, maps {maps.shape}, {len(names)} names "
                     f"and {len(np.ravel(scores))} scores must describe the same N images")
  if masks is not None and np.shape(masks) != maps.shape:
    raise ValueError(f"save_heatmaps: masks {np.shape(masks)} differ from maps {maps.shape}")
  count = n if limit < 0 else min(limit, n)
  if value_range is None:
    value_range = (float(maps.min()), float(maps.max())) if n else (0.0, 1.0)
  paths = []
  for i in range(count):
    panel = heatmap_panel(images[i], None if masks is None else masks[i], maps[i], value_range,
                          f"{names[i]}  score {float(np.ravel(scores)[i]):.4f}")
    buf = io.BytesIO()
    panel.save(buf, format="PNG")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(names[i])).strip("_")
    path = os.path.join(os.fspath(directory), f"{i:04d}_{safe}.png")
    fileio.atomic_write(path, buf.getvalue())
    paths.append(path)
  return paths


def heatmap_indices(n: int, limit: int) -> np.ndarray:
  """Indices of the test images drawn as heatmaps (`eval.heatmaps`: a count, -1 = all), spread
  over the set so good and defective images both appear."""
  count = n if limit < 0 else min(limit, n)
  return np.unique(np.linspace(0, n - 1, count).round().astype(int)) if count else np.zeros(0, int)
