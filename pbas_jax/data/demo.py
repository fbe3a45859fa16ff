"""Embedded demo dataset: procedural textures with synthetic defects in the MVTec AD layout.

Nothing is downloaded: every image is rendered from numpy noise, deterministically from a seed, so
the whole pipeline (features, training, evaluation, heatmaps) can be run anywhere in minutes.

Layout written under `root`: the MVTec AD layout, which the main job (`dataset.name=demo`) reads
with the `folder` builder (`pbas_jax.data.builders.PbasFolder`):

  <root>/<class>/train/good/000.png ...
  <root>/<class>/test/good/000.png ...
  <root>/<class>/test/<defect>/000.png ...
  <root>/<class>/ground_truth/<defect>/000_mask.png    (uint8, 0 or 255)

Classes and their defects:

  brushed_metal: scratch (thin bright or dark line across the grain), dent (shaded depression),
                 stain (rust-coloured blob)
  woven:         cut (jagged dark tear), hole (missing threads), color (dye spot)

A defect is drawn as `image + alpha * delta`, where `alpha` is the binary mask lightly blurred for
anti-aliasing; the saved mask is that binary region, so pixels change only inside the mask and
within a couple of pixels of its border.
"""
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

# Bumped whenever the rendering changes, so that an old tree is not taken for a complete new one.
_VERSION = 1
_MANIFEST = ".demo.json"


# ------------------------------------------------------------------------------------------------
# Shared drawing helpers. Images are float (H, W, 3) in [0, 1]; masks are bool (H, W).


def _unit_noise(rng: np.random.Generator, n: int, sigma) -> np.ndarray:
  """Gaussian-filtered white noise, periodic, rescaled to zero mean and unit std: (n, n)."""
  x = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma, mode="wrap")
  return (x - x.mean()) / (x.std() + 1e-8)


def _grid(n: int):
  """Pixel-centre coordinates (y, x), each (n, n)."""
  return np.mgrid[0:n, 0:n].astype(np.float64) + 0.5


def _polyline_distance(points: np.ndarray, n: int) -> np.ndarray:
  """Distance of every pixel centre to a polyline given by (P, 2) (y, x) vertices: (n, n)."""
  yy, xx = _grid(n)
  pix = np.stack([yy.ravel(), xx.ravel()], axis=1)  # (n*n, 2)
  a, b = points[:-1], points[1:]  # (S, 2) segment ends
  ab = b - a
  t = ((pix[:, None, :] - a[None]) * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12)
  closest = a[None] + np.clip(t, 0.0, 1.0)[..., None] * ab[None]  # (n*n, S, 2)
  return np.sqrt(((pix[:, None, :] - closest) ** 2).sum(-1)).min(axis=1).reshape(n, n)


def _blob(rng: np.random.Generator, n: int, radius: float, margin: float) -> np.ndarray:
  """An irregular, connected blob of about `radius` pixels, fully inside the image: (n, n) bool."""
  cy, cx = rng.uniform(margin, n - margin, size=2)
  yy, xx = _grid(n)
  ry, rx = radius * rng.uniform(0.7, 1.3, size=2)
  d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
  # An elliptic envelope (1 at the centre, 0 on the ellipse) with noisy borders.
  field = (1.0 - d2) + 0.35 * _unit_noise(rng, n, max(radius / 3.0, 1.0))
  inside = field > 0.0
  # Keep only the component holding the centre, so that the blob is one defect.
  labels, _ = ndimage.label(inside)
  centre = labels[min(int(cy), n - 1), min(int(cx), n - 1)]
  if centre == 0:  # the noise punched the centre out: fall back to the plain ellipse
    return d2 <= 1.0
  return ndimage.binary_fill_holes(labels == centre)


def _apply(image: np.ndarray, mask: np.ndarray, target: np.ndarray, opacity: float = 1.0):
  """Blends `target` (H, W, 3) into `image` over `mask`, with a 1-pixel anti-aliased border."""
  alpha = opacity * np.clip(ndimage.gaussian_filter(mask.astype(np.float64), 0.6), 0.0, 1.0)
  alpha = np.where(mask, opacity, alpha)  # the border blur only ever widens, never dims, the mask
  return image + alpha[..., None] * (target - image)


def _random_walk(rng: np.random.Generator, n: int, length: float, jitter: float) -> np.ndarray:
  """A jagged path of total `length` pixels starting away from the border: (P, 2) (y, x) points."""
  steps = max(int(length / 3.0), 2)
  heading = rng.uniform(0.0, 2.0 * np.pi)
  angles = heading + np.cumsum(rng.normal(0.0, jitter, size=steps))
  deltas = 3.0 * np.stack([np.sin(angles), np.cos(angles)], axis=1)
  path = np.concatenate([np.zeros((1, 2)), np.cumsum(deltas, axis=0)])
  # Centre the path's bounding box at a random point where it fits inside the image.
  lo, hi = path.min(0), path.max(0)
  span = hi - lo
  start = rng.uniform(0.08 * n, np.maximum(0.92 * n - span, 0.08 * n + 1e-3))
  return path - lo + start


# ------------------------------------------------------------------------------------------------
# brushed_metal


def _brushed_metal(rng: np.random.Generator, n: int) -> np.ndarray:
  """Brushed steel: streaks along x, fine grain, a soft light gradient: (n, n, 3)."""
  streaks = _unit_noise(rng, n, (0.6, 0.2 * n))
  grain = _unit_noise(rng, n, 0.7)
  yy, xx = _grid(n) / n - 0.5
  theta = rng.uniform(0.0, 2.0 * np.pi)
  light = np.cos(theta) * yy + np.sin(theta) * xx
  level = rng.uniform(0.5, 0.6)
  gray = level + 0.05 * streaks + 0.015 * grain + 0.12 * light
  tint = np.array([0.97, 0.99, 1.03])  # slightly cold steel
  return gray[..., None] * tint


def _scratch(rng, image):
  n = image.shape[0]
  # Across the grain (brushing runs along x), slightly curved: a quadratic Bezier.
  angle = rng.uniform(np.deg2rad(25), np.deg2rad(155))
  length = rng.uniform(0.3, 0.55) * n
  centre = rng.uniform(0.3 * n, 0.7 * n, size=2)
  direction = np.array([np.sin(angle), np.cos(angle)])
  normal = np.array([-direction[1], direction[0]])
  p0, p2 = centre - 0.5 * length * direction, centre + 0.5 * length * direction
  p1 = centre + rng.uniform(-0.15, 0.15) * length * normal
  t = np.linspace(0.0, 1.0, 32)[:, None]
  curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
  width = rng.uniform(1.5, 2.5) * n / 128
  mask = _polyline_distance(curve, n) <= width / 2
  value = rng.choice([0.9, 0.2])  # a bright (fresh) or dark (dirty) scratch
  return _apply(image, mask, np.full_like(image, value)), mask


def _dent(rng, image):
  n = image.shape[0]
  radius = rng.uniform(0.07, 0.1) * n
  cy, cx = rng.uniform(radius + 4, n - radius - 4, size=2)
  yy, xx = _grid(n)
  ry, rx = radius * rng.uniform(0.75, 1.25, size=2)
  dy, dx = (yy - cy) / ry, (xx - cx) / rx
  mask = dy ** 2 + dx ** 2 <= 1.0
  # A depression lit from one side: bright on the far rim, dark on the near one, darker overall.
  light = rng.uniform(0.0, 2.0 * np.pi)
  bump = np.exp(-1.5 * (dy ** 2 + dx ** 2))
  shade = -(np.sin(light) * dy + np.cos(light) * dx) * bump
  delta = (0.6 * shade - 0.1 * bump)[..., None]
  return _apply(image, mask, image + delta), mask


def _stain(rng, image):
  n = image.shape[0]
  radius = rng.uniform(0.07, 0.12) * n
  mask = _blob(rng, n, radius, margin=1.5 * radius)
  rust = np.array([0.55, 0.3, 0.15]) * rng.uniform(0.8, 1.1)
  texture = 1.0 + 0.15 * _unit_noise(rng, n, 1.5)[..., None]
  return _apply(image, mask, rust * texture, opacity=rng.uniform(0.7, 0.9)), mask


# ------------------------------------------------------------------------------------------------
# woven


def _woven(rng: np.random.Generator, n: int) -> np.ndarray:
  """Plain-weave fabric: warp (vertical) and weft threads alternating over/under: (n, n, 3)."""
  period = n / 16.0
  yy, xx = _grid(n)
  tilt = np.deg2rad(rng.uniform(-3.0, 3.0))
  u = (np.cos(tilt) * xx + np.sin(tilt) * yy) / period + rng.uniform(0, 1)
  v = (-np.sin(tilt) * xx + np.cos(tilt) * yy) / period + rng.uniform(0, 1)
  warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
  # Thread cross-sections (0 in the gaps), raised where the thread passes over the other one.
  warp = np.sin(np.pi * (u % 1.0)) ** 0.6 * np.where(warp_on_top, 1.0, 0.55)
  weft = np.sin(np.pi * (v % 1.0)) ** 0.6 * np.where(warp_on_top, 0.55, 1.0)
  # Fibres: streak noise along each thread's direction.
  fibre_warp = _unit_noise(rng, n, (0.25 * period, 0.5))
  fibre_weft = _unit_noise(rng, n, (0.5, 0.25 * period))
  base = np.array([0.78, 0.7, 0.55]) * rng.uniform(0.9, 1.05)  # undyed linen
  warp_rgb = base * (0.3 + 0.7 * warp)[..., None] * (1 + 0.06 * fibre_warp)[..., None]
  weft_rgb = 0.93 * base * (0.3 + 0.7 * weft)[..., None] * (1 + 0.06 * fibre_weft)[..., None]
  return np.where((warp >= weft)[..., None], warp_rgb, weft_rgb)


def _cut(rng, image):
  n = image.shape[0]
  path = _random_walk(rng, n, length=rng.uniform(0.3, 0.5) * n, jitter=0.45)
  width = rng.uniform(2.0, 3.0) * n / 128
  mask = _polyline_distance(path, n) <= width / 2
  return _apply(image, mask, np.full_like(image, 0.08)), mask


def _hole(rng, image):
  n = image.shape[0]
  radius = rng.uniform(0.05, 0.08) * n
  mask = _blob(rng, n, radius, margin=1.5 * radius)
  # Dark backing seen through the hole, with a few frayed fibres crossing it.
  fibres = np.clip(_unit_noise(rng, n, (0.5, 2.0)), 0.0, None)[..., None]
  backing = 0.06 + 0.25 * np.clip(fibres - 1.2, 0.0, 1.0) * image
  return _apply(image, mask, backing), mask


def _color(rng, image):
  n = image.shape[0]
  radius = rng.uniform(0.07, 0.12) * n
  mask = _blob(rng, n, radius, margin=1.5 * radius)
  dyes = np.array([[0.9, 0.15, 0.15], [0.15, 0.55, 0.2], [0.15, 0.25, 0.85]])
  dye = dyes[rng.integers(len(dyes))]
  # A dye soaks into the threads: the weave shading stays visible under the colour.
  return _apply(image, mask, 1.1 * image * dye, opacity=rng.uniform(0.75, 0.9)), mask


Defect = Callable[[np.random.Generator, np.ndarray], tuple]

CLASSES: dict[str, tuple[Callable[[np.random.Generator, int], np.ndarray], dict[str, Defect]]] = {
    "brushed_metal": (_brushed_metal, {"scratch": _scratch, "dent": _dent, "stain": _stain}),
    "woven": (_woven, {"cut": _cut, "hole": _hole, "color": _color}),
}


# ------------------------------------------------------------------------------------------------
# Public API


def render(class_name: str, defect: Optional[str], seed: Sequence[int], image_size: int):
  """Renders one sample.

  Args:
    class_name: a key of `CLASSES`.
    defect: one of that class's defect names, or None for a defect-free image.
    seed: entropy of the sample (e.g. `(dataset_seed, class, split, index)`). The texture depends
      only on it, so `render(c, None, s, n)` is the defect-free version of `render(c, d, s, n)`.
    image_size: side length n in pixels.

  Returns:
    image: uint8 (n, n, 3).
    mask: bool (n, n), all False when `defect` is None.
  """
  if class_name not in CLASSES:
    raise ValueError(f"unknown demo class {class_name!r}; choose from {sorted(CLASSES)}")
  texture, defects = CLASSES[class_name]
  if defect is not None and defect not in defects:
    raise ValueError(f"unknown defect {defect!r} of demo class {class_name!r}; "
                     f"choose from {sorted(defects)}")
  texture_seed, defect_seed = np.random.SeedSequence(list(seed)).spawn(2)
  image = texture(np.random.default_rng(texture_seed), image_size)
  mask = np.zeros((image_size, image_size), bool)
  if defect is not None:
    image, mask = defects[defect](np.random.default_rng(defect_seed), image)
  return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mask


def _write_png(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _write_class(directory: pathlib.Path, class_index: int, class_name: str, settings: dict):
  """Writes one class's MVTec tree into `directory` (a fresh, private folder)."""
  seed, n = settings["seed"], settings["image_size"]
  splits = [("train", "good", settings["n_train"]), ("test", "good", settings["n_test_good"])]
  splits += [("test", d, settings["n_test_defect"]) for d in CLASSES[class_name][1]]
  for split_index, (split, kind, count) in enumerate(splits):
    for i in range(count):
      image, mask = render(class_name, None if kind == "good" else kind,
                           (seed, class_index, split_index, i), n)
      _write_png(directory / split / kind / f"{i:03d}.png", image)
      if kind != "good":
        _write_png(directory / "ground_truth" / kind / f"{i:03d}_mask.png",
                   mask.astype(np.uint8) * 255)
  (directory / _MANIFEST).write_text(json.dumps(settings, sort_keys=True))


def make_demo_dataset(root, *, seed: int = 0, image_size: int = 128, n_train: int = 24,
                      n_test_good: int = 8, n_test_defect: int = 4,
                      classes: Sequence[str] = tuple(CLASSES)) -> pathlib.Path:
  """Writes the demo dataset under `root` (MVTec layout) unless it is already there.

  Each class folder is written to a temporary sibling and renamed into place, so a class folder
  that exists is complete; it holds a `.demo.json` manifest of the settings that made it.

  Args:
    root: destination folder (created if missing).
    seed: dataset seed; the same settings always give the same bytes.
    image_size: side of the square images, pixels (>= 64; defects scale with it).
    n_train: defect-free training images per class.
    n_test_good: defect-free test images per class.
    n_test_defect: test images per defect type (three types per class).
    classes: which of `CLASSES` to write.

  Returns:
    `root` as a path.

  Raises:
    ValueError: bad settings, or `root/<class>` exists but was made with other settings or is not
      a demo tree.
  """
  if image_size < 64:
    raise ValueError(f"make_demo_dataset: image_size={image_size} is too small; use >= 64")
  if min(n_train, n_test_good, n_test_defect) < 1:
    raise ValueError("make_demo_dataset: n_train, n_test_good and n_test_defect must be >= 1, got "
                     f"{n_train}, {n_test_good}, {n_test_defect}")
  unknown = sorted(set(classes) - set(CLASSES))
  if unknown:
    raise ValueError(f"make_demo_dataset: unknown classes {unknown}; choose from {sorted(CLASSES)}")
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  settings = dict(version=_VERSION, seed=seed, image_size=image_size, n_train=n_train,
                  n_test_good=n_test_good, n_test_defect=n_test_defect)
  for class_name in classes:
    final = root / class_name
    if not final.exists():
      tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{class_name}.tmp-", dir=root))
      try:
        _write_class(tmp, list(CLASSES).index(class_name), class_name, settings)
        os.rename(tmp, final)
      except OSError:
        if not final.is_dir():  # not a concurrent writer that finished first: a real failure
          raise
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _check_existing(final, settings)
  return root


def _check_existing(directory: pathlib.Path, settings: dict) -> None:
  manifest = directory / _MANIFEST
  if not manifest.is_file():
    raise ValueError(f"{directory} exists but is not a demo dataset (no {_MANIFEST}); "
                     "pass another root or remove it")
  found = json.loads(manifest.read_text())
  if found != settings:
    raise ValueError(f"{directory} was made with {found}, not the requested {settings}; "
                     "pass another root or remove that folder to regenerate it")
