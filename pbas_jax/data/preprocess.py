"""Image and mask preprocessing, identical to the reference's torchvision pipeline by default.

Image: PIL RGB (grayscale, palette and RGBA converted) -> geometry (below) -> ToTensor (/ 255 in
float32) -> ImageNet normalization (`IMAGENET_MEAN`, `IMAGENET_STD`, the only copy).

Geometry (`dataset.resize_mode`, resolved by `geometry`):

  "crop"     the reference: resize of the shorter side to `resize` with PIL bilinear (antialiased
             as PIL does; the longer side becomes int(resize * long / short), as torchvision
             computes it) -> center crop `image_size` (offsets rounded as torchvision rounds them).
             On non-square images the crop drops the ends of the longer side, defects there
             included (`data.crop_losses` measures this).
  "stretch"  the whole image resized bilinearly to image_size x image_size (aspect ratio not kept,
             nothing dropped; `resize` is unused).
  "auto"     crop for the benchmark datasets (mvtec, visa, mpdd), stretch for folder and demo.

Masks follow the same geometry; `rule` says how the resized mask becomes binary. Every rule
returns a float32 0/1 map, so downstream code reads `mask > 0.5` whatever the dataset:

  "exact"    MVTec AD, MPDD, folder (reference): mask converted to 'L', resized bilinearly as the
             image, not binarized; the reference's metrics cast ToTensor's value to int, so only
             pixels whose resized value is exactly 255 (1.0 after / 255) count as anomalous. The
             cast is applied here.
  "positive" VisA (reference): mask converted to 'F' (float32), resized bilinearly, then > 0, so
             every pixel the bilinear kernel touches from an anomalous pixel counts.
  "binary"   option `mask_mode='binary'`: mask converted to 'L', nearest-neighbour resize, > 0.
"""
import dataclasses
import io
import os
import pathlib
from typing import Union

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MASK_RULES = ("exact", "positive", "binary")
MASK_MODES = ("reference", "binary")  # dataset.mask_mode
RESIZE_MODES = ("auto", "crop", "stretch")
# Datasets whose reference geometry (crop) `resize_mode='auto'` keeps; others are stretched.
CROP_DATASETS = ("mvtec", "visa", "mpdd")


class DatasetError(ValueError):
  """Bad raw data or settings; the message names the path or setting and how to fix it."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
  """A raw data folder or file, or the prepared data, does not exist."""


def image_files(folder) -> list:
  """Image files (`IMAGE_EXTENSIONS`) of a folder as paths, sorted by name; hidden and other files
  are ignored. Used by the builders and by `pbas_jax.predict`."""
  return sorted(p for p in pathlib.Path(folder).iterdir() if p.is_file()
                and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def open_image(source: Union[bytes, str, os.PathLike], name: str) -> Image.Image:
  """Decodes an image file completely (so truncation is found now, not mid-training).

  Args:
    source: the encoded file's bytes, or its path.
    name: what to call the file in an error message (usually its path).

  Returns:
    The loaded PIL image, in the file's own mode.
  """
  try:
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
  except FileNotFoundError as e:
    raise DatasetNotFoundError(f"image file {name} does not exist") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL reports unknown formats, truncated data and bad chunks through these types.
    raise DatasetError(f"cannot read image file {name} ({e}): Pillow cannot decode it (a "
                       "truncated or damaged file, or not an image despite its extension). Open "
                       "it in an image viewer to check; save or copy it again from where it came "
                       "from, or move it out of the folder") from e
  return image


def class_resize(dataset: str, class_name: str, image_size: int, resize: int) -> int:
  """Shorter-side size for a class: the reference's MVTec `toothbrush`/`wood` rule, else `resize`.

  The reference replaces `resize` by int(image_size * 8 / 7) (329 at 288) for these two classes.
  """
  if dataset == "mvtec" and class_name in ("toothbrush", "wood"):
    return int(image_size * 8 / 7)
  return resize


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How a source image of any size becomes (size, size) (module docstring).

  size: output side S; resize: shorter side before the crop (mode "crop" only);
  mode: "crop" | "stretch".
  """
  size: int
  resize: int
  mode: str

  def resized(self, w: int, h: int) -> tuple:
    """(width, height) of a w x h image after the resize step."""
    if self.mode == "stretch":
      return self.size, self.size
    if w <= h:
      return self.resize, int(self.resize * h / w)
    return int(self.resize * w / h), self.resize

  def window(self, w: int, h: int) -> tuple:
    """(left, top, right, bottom) of the kept region, in the resized image's pixels."""
    rw, rh = self.resized(w, h)
    # Python's round (half to even) on the half-difference, as torchvision's center_crop.
    top = int(round((rh - self.size) / 2.0))
    left = int(round((rw - self.size) / 2.0))
    return left, top, left + self.size, top + self.size

  def apply(self, image: Image.Image, resample: int) -> Image.Image:
    """The (size, size) PIL image, resized with `resample` (and center-cropped in crop mode)."""
    w, h = image.size
    image = image.resize(self.resized(w, h), resample)
    return image if self.mode == "stretch" else image.crop(self.window(w, h))


def geometry(dataset: str, class_name: str, image_size: int, resize: int,
             resize_mode: str = "auto") -> Geometry:
  """The geometry of a class under `dataset.resize_mode` (auto | crop | stretch).

  Training, evaluation and `pbas_jax.predict` all call this, so they preprocess alike.
  """
  if resize_mode not in RESIZE_MODES:
    raise ValueError(f"dataset.resize_mode={resize_mode!r} is not valid; choose one of "
                     f"{', '.join(RESIZE_MODES)}")
  if resize_mode == "auto":
    resize_mode = "crop" if dataset in CROP_DATASETS else "stretch"
  if resize_mode == "stretch":
    if image_size <= 0:
      raise ValueError(f"dataset.image_size ({image_size}) must be > 0")
    return Geometry(image_size, image_size, "stretch")
  resize = class_resize(dataset, class_name, image_size, resize)
  if image_size <= 0 or resize < image_size:
    raise ValueError(f"dataset.resize ({resize}) must be >= dataset.image_size ({image_size}) > 0: "
                     "the center crop is taken from the resized image")
  return Geometry(image_size, resize, "crop")


def mask_pixels(mask: Image.Image) -> np.ndarray:
  """Anomalous pixels of a mask in any mode at its own resolution (> 0): bool (H, W)."""
  # 'L' maps palette, colour and 1-bit masks to gray levels; wider modes are compared directly.
  return np.asarray(mask if mask.mode in ("I", "I;16", "F") else mask.convert("L")) > 0


def preprocess_image(image: Image.Image, geo: Geometry) -> np.ndarray:
  """PIL image (any mode) -> normalized float32 (S, S, 3)."""
  x = np.asarray(geo.apply(image.convert("RGB"), Image.BILINEAR), np.float32) / np.float32(255.0)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def preprocess_mask(mask: Image.Image, geo: Geometry, rule: str) -> np.ndarray:
  """PIL mask (any mode) -> float32 0/1 (S, S) by `rule` (module docstring)."""
  if rule == "exact":
    return (np.asarray(geo.apply(mask.convert("L"), Image.BILINEAR)) == 255).astype(np.float32)
  if rule == "positive":
    return (np.asarray(geo.apply(mask.convert("F"), Image.BILINEAR)) > 0).astype(np.float32)
  if rule == "binary":
    return (np.asarray(geo.apply(mask.convert("L"), Image.NEAREST)) > 0).astype(np.float32)
  raise ValueError(f"mask rule {rule!r} is not one of {', '.join(MASK_RULES)}")


def mask_rule(dataset: str, mask_mode: str) -> str:
  """The mask rule of `dataset` under `dataset.mask_mode` ('reference' | 'binary')."""
  if mask_mode == "binary":
    return "binary"
  if mask_mode == "reference":
    return "positive" if dataset == "visa" else "exact"
  raise ValueError(f"dataset.mask_mode={mask_mode!r} is not valid; choose one of "
                   f"{' or '.join(MASK_MODES)}")


def load_image(path: Union[str, os.PathLike], geo: Geometry) -> np.ndarray:
  """Reads and preprocesses one image file (e.g. for prediction): float32 (S, S, 3)."""
  return preprocess_image(open_image(path, os.fspath(path)), geo)
