"""Image and mask preprocessing, identical to the reference's torchvision pipeline by default.

Image: PIL RGB (grayscale, palette and RGBA converted) -> resize of the shorter side to `resize`
with PIL bilinear (antialiased as PIL does; the longer side becomes int(resize * long / short), as
torchvision computes it) -> center crop `image_size` (offsets rounded as torchvision rounds them)
-> ToTensor (/ 255 in float32) -> ImageNet normalization.

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
import io
import os
from typing import Union

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MASK_RULES = ("exact", "positive", "binary")


class DatasetError(ValueError):
  """Bad raw data or settings; the message names the path or setting and how to fix it."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
  """A raw data folder or file, or the prepared data, does not exist."""


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
    raise DatasetError(f"cannot read image file {name} ({e}): the file is unreadable or "
                       "truncated; replace it with a good copy from the original download") from e
  return image


def check_sizes(image_size: int, resize: int) -> None:
  if image_size <= 0 or resize < image_size:
    raise ValueError(f"dataset.resize ({resize}) must be >= dataset.image_size ({image_size}) > 0: "
                     "the center crop is taken from the resized image")


def class_resize(dataset: str, class_name: str, image_size: int, resize: int) -> int:
  """Shorter-side size for a class: the reference's MVTec `toothbrush`/`wood` rule, else `resize`.

  The reference replaces `resize` by int(image_size * 8 / 7) (329 at 288) for these two classes.
  """
  if dataset == "mvtec" and class_name in ("toothbrush", "wood"):
    return int(image_size * 8 / 7)
  return resize


def _resize_shorter(image: Image.Image, size: int, resample: int) -> Image.Image:
  """Resizes the shorter side to `size`, the longer one to int(size * long / short)."""
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  return image.resize((new_w, new_h), resample)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
  w, h = image.size
  # Python's round (half to even) on the half-difference, as torchvision's center_crop.
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, image_size: int, resize: int) -> np.ndarray:
  """PIL image (any mode) -> normalized float32 (image_size, image_size, 3)."""
  check_sizes(image_size, resize)
  image = _center_crop(_resize_shorter(image.convert("RGB"), resize, Image.BILINEAR), image_size)
  x = np.asarray(image, np.float32) / np.float32(255.0)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def preprocess_mask(mask: Image.Image, image_size: int, resize: int, rule: str) -> np.ndarray:
  """PIL mask (any mode) -> float32 0/1 (image_size, image_size) by `rule` (module docstring)."""
  check_sizes(image_size, resize)
  if rule == "exact":
    m = _center_crop(_resize_shorter(mask.convert("L"), resize, Image.BILINEAR), image_size)
    return (np.asarray(m) == 255).astype(np.float32)
  if rule == "positive":
    m = _center_crop(_resize_shorter(mask.convert("F"), resize, Image.BILINEAR), image_size)
    return (np.asarray(m) > 0).astype(np.float32)
  if rule == "binary":
    m = _center_crop(_resize_shorter(mask.convert("L"), resize, Image.NEAREST), image_size)
    return (np.asarray(m) > 0).astype(np.float32)
  raise ValueError(f"mask rule {rule!r} is not one of {', '.join(MASK_RULES)}")


def mask_rule(dataset: str, mask_mode: str) -> str:
  """The mask rule of `dataset` under `dataset.mask_mode` ('reference' | 'binary')."""
  if mask_mode == "binary":
    return "binary"
  if mask_mode == "reference":
    return "positive" if dataset == "visa" else "exact"
  raise ValueError(f"dataset.mask_mode={mask_mode!r} is not valid; choose reference or binary")


def load_image(path: Union[str, os.PathLike], image_size: int = 288,
               resize: int = 288) -> np.ndarray:
  """Reads and preprocesses one image file (e.g. for prediction): float32 (S, S, 3)."""
  return preprocess_image(open_image(path, os.fspath(path)), image_size, resize)
