"""Writes tiny raw dataset trees (MVTec AD / MPDD / folder layout, VisA) for the data tests.

Images encode who they are: test image k of a type is filled with gray level `image_value(k)`
and its mask is a white square of side `mask_side(k)` in the middle (it survives center crops),
so a test can check that each image came with its own mask.
"""
import csv
import pathlib

import numpy as np
from PIL import Image


def image_value(k: int) -> int:
  return 20 + 10 * k


def mask_side(k: int) -> int:
  return 2 * (k + 1)


def write_image(path: pathlib.Path, array: np.ndarray, mode: str = None) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8), mode).save(path)
  return path


def gray_image(size, value: int, channels: int = 3) -> np.ndarray:
  """Constant image of (width, height) `size`: (H, W, channels) or (H, W) when channels is 1."""
  w, h = size
  return np.full((h, w) if channels == 1 else (h, w, channels), value, np.uint8)


def square_mask(size, side: int, high: int = 255) -> np.ndarray:
  w, h = size
  m = np.zeros((h, w), np.uint8)
  top, left = (h - side) // 2, (w - side) // 2
  m[top:top + side, left:left + side] = high
  return m


def mvtec_tree(root: pathlib.Path, class_name: str = "bottle", *, n_train: int = 3,
               test=(("good", 2), ("crack", 3)), size=(40, 40), channels: int = 3,
               masks: bool = True, mask_high: int = 255) -> pathlib.Path:
  """<root>/<class>/{train/good, test/<type>, ground_truth/<type>} with PNG files; returns root.

  test: (type, count) pairs; "good" gets no masks. masks=False omits ground_truth/.
  """
  base = root / class_name
  for k in range(n_train):
    write_image(base / "train" / "good" / f"{k:03d}.png", gray_image(size, 100 + k, channels))
  for defect, count in test:
    for k in range(count):
      write_image(base / "test" / defect / f"{k:03d}.png",
                  gray_image(size, image_value(k), channels))
      if masks and defect != "good":
        write_image(base / "ground_truth" / defect / f"{k:03d}_mask.png",
                    square_mask(size, mask_side(k), mask_high))
  return root


def noisy_mvtec_tree(root: pathlib.Path, *, n_train: int, test, size) -> pathlib.Path:
  """`mvtec_tree` of class `bottle` whose images are random noise (seed 0), so that features and
  scores differ between images; masks as `mvtec_tree` draws them. size: (width, height)."""
  mvtec_tree(root, "bottle", n_train=n_train, test=test, size=size)
  rng = np.random.default_rng(0)
  for path in sorted(root.glob("bottle/*/*/*.png")):
    if "ground_truth" not in path.parts:
      write_image(path, rng.integers(0, 255, (size[1], size[0], 3)))
  return root


def visa_tree(root: pathlib.Path, classes=("candle", "pcb1"), *, n_train: int = 3,
              n_normal: int = 2, n_anomaly: int = 2, size=(48, 36)) -> pathlib.Path:
  """VisA 1cls layout: JPEG images, PNG masks, split_csv/1cls.csv; returns root."""
  rows = []
  for name in classes:
    for k in range(n_train):
      rel = f"{name}/Data/Images/Normal/train_{k:03d}.JPG"
      write_image(root / rel, gray_image(size, 100 + k))
      rows.append([name, "train", "normal", rel, ""])
    for k in range(n_normal):
      rel = f"{name}/Data/Images/Normal/test_{k:03d}.JPG"
      write_image(root / rel, gray_image(size, 60 + k))
      rows.append([name, "test", "normal", rel, ""])
    for k in range(n_anomaly):
      rel = f"{name}/Data/Images/Anomaly/{k:03d}.JPG"
      write_image(root / rel, gray_image(size, image_value(k)))
      mask_rel = f"{name}/Data/Masks/Anomaly/{k:03d}.png"
      write_image(root / mask_rel, square_mask(size, mask_side(k)))
      rows.append([name, "test", "anomaly", rel, mask_rel])
  write_visa_csv(root, rows)
  return root


def write_visa_csv(root: pathlib.Path, rows, header=("object", "split", "label", "image", "mask")):
  path = root / "split_csv" / "1cls.csv"
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


# Defective test images of `nonsquare_tree`: name -> ((width, height), mask box (x0, y0, x1, y1)).
# Under a center crop (shorter side = crop size) `top` loses its whole defect, `right` 75% and
# `left` 50% of it; `center` keeps it. Stretching keeps every defect.
NONSQUARE_DEFECTS = {
    "center": ((60, 60), (20, 20, 40, 40)),
    "left": ((108, 40), (24, 10, 44, 30)),    # aspect 2.7; columns 34..73 survive the crop
    "right": ((100, 50), (70, 20, 90, 30)),   # aspect 2.0; columns 25..74 survive
    "top": ((40, 100), (10, 2, 30, 14)),      # aspect 0.4; rows 30..69 survive
}
NONSQUARE_LOST = {"center": 0.0, "left": 0.5, "right": 0.75, "top": 1.0}


def nonsquare_tree(root: pathlib.Path, class_name: str = "part", *, masks: bool = True,
                   defects: bool = True, seed: int = 0) -> pathlib.Path:
  """A folder class of noise images with aspect ratios 0.4 to 2.7: 6 train/good, 2 test/good and
  (with `defects`) test/defect/<NONSQUARE_DEFECTS> with masks in ground_truth/ (`masks`); the
  defect region is brightened. Returns root."""
  rng = np.random.default_rng(seed)
  base = root / class_name

  def noise(w, h):
    return rng.integers(60, 120, (h, w, 3))

  for k, size in enumerate([(40, 100), (60, 80), (64, 64), (80, 60), (100, 50), (108, 40)]):
    write_image(base / "train" / "good" / f"{k:03d}.png", noise(*size))
  for k, size in enumerate([(50, 100), (100, 50)]):
    write_image(base / "test" / "good" / f"{k:03d}.png", noise(*size))
  for name, ((w, h), (x0, y0, x1, y1)) in NONSQUARE_DEFECTS.items() if defects else ():
    image = noise(w, h)
    image[y0:y1, x0:x1] = 250
    write_image(base / "test" / "defect" / f"{name}.png", image)
    if masks:
      mask = np.zeros((h, w), np.uint8)
      mask[y0:y1, x0:x1] = 255
      write_image(base / "ground_truth" / "defect" / f"{name}_mask.png", mask)
  return root
