"""Preprocessing: values against PIL by hand, the reference's mask rules, torchvision parity."""
import importlib.util

import numpy as np
from PIL import Image
import pytest

from conftest import require
from pbas_jax.data import preprocess
from pbas_jax.data.preprocess import DatasetError

MEAN, STD = preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD


def crop(image_size, resize):
  return preprocess.Geometry(image_size, resize, "crop")


def _random_image(h, w, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  shape = (h, w) if mode == "L" else (h, w, len(mode))
  return Image.fromarray(rng.integers(0, 256, shape, np.uint8), mode)


def test_image_resize_crop_normalize_by_hand():
  image = _random_image(30, 40)  # H=30, W=40
  out = preprocess.preprocess_image(image, crop(32, 36))
  # Shorter side 30 -> 36; longer 40 -> int(36 * 40 / 30) = 48; crop offsets (36-32)/2, (48-32)/2.
  resized = np.asarray(image.resize((48, 36), Image.BILINEAR), np.float32)
  expected = (resized[2:34, 8:40] / np.float32(255) - MEAN) / STD
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_portrait_image_resizes_its_width():
  image = _random_image(50, 20)
  out = preprocess.preprocess_image(image, crop(16, 16))
  resized = np.asarray(image.resize((16, 40), Image.BILINEAR), np.float32)  # int(16 * 50 / 20)
  np.testing.assert_allclose(out, (resized[12:28] / np.float32(255) - MEAN) / STD, atol=1e-6)


@pytest.mark.parametrize("width,left", [(73, 20), (75, 22)])
def test_center_crop_rounds_half_to_even_like_torchvision(width, left):
  # Half-differences 20.5 and 21.5 round to 20 and 22 (Python's round).
  image = _random_image(32, width)
  out = preprocess.preprocess_image(image, crop(32, 32))
  expected = (np.asarray(image, np.float32)[:, left:left + 32] / np.float32(255) - MEAN) / STD
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_grayscale_and_rgba_become_rgb():
  gray = _random_image(20, 20, "L")
  out = preprocess.preprocess_image(gray, crop(20, 20))
  channels = (np.asarray(gray, np.float32)[..., None] / np.float32(255) - MEAN) / STD
  np.testing.assert_allclose(out, channels, atol=1e-6)
  rgba = _random_image(20, 20, "RGBA")
  np.testing.assert_allclose(preprocess.preprocess_image(rgba, crop(20, 20)),
                             preprocess.preprocess_image(rgba.convert("RGB"), crop(20, 20)))


def _square_mask(size, side, value=255):
  m = np.zeros((size, size), np.uint8)
  m[5:5 + side, 5:5 + side] = value
  return Image.fromarray(m)


def test_exact_rule_counts_only_full_pixels():
  m = np.zeros((16, 16), np.uint8)
  m[:4, :4] = 255
  m[8:10, 8:10] = 254  # 254 / 255 < 1.0: the reference's int cast drops it
  out = preprocess.preprocess_mask(Image.fromarray(m), crop(16, 16), "exact")
  assert out.dtype == np.float32 and out.shape == (16, 16)
  np.testing.assert_array_equal(out, (m == 255).astype(np.float32))


def test_mask_rules_after_downsampling_by_hand():
  mask = _square_mask(40, 9)
  exact = preprocess.preprocess_mask(mask, crop(32, 32), "exact")
  positive = preprocess.preprocess_mask(mask, crop(32, 32), "positive")
  binary = preprocess.preprocess_mask(mask, crop(32, 32), "binary")
  by_hand_l = np.asarray(mask.resize((32, 32), Image.BILINEAR))
  by_hand_f = np.asarray(mask.convert("F").resize((32, 32), Image.BILINEAR))
  by_hand_n = np.asarray(mask.resize((32, 32), Image.NEAREST))
  np.testing.assert_array_equal(exact, by_hand_l == 255)
  np.testing.assert_array_equal(positive, by_hand_f > 0)
  np.testing.assert_array_equal(binary, by_hand_n > 0)
  # Bilinear blurs the border: exact keeps the core, positive every touched pixel.
  assert 0 < exact.sum() < binary.sum() < positive.sum()
  assert np.all(positive >= exact)


def test_mask_rule_per_dataset():
  assert preprocess.mask_rule("mvtec", "reference") == "exact"
  assert preprocess.mask_rule("mpdd", "reference") == "exact"
  assert preprocess.mask_rule("folder", "reference") == "exact"
  assert preprocess.mask_rule("visa", "reference") == "positive"
  assert preprocess.mask_rule("visa", "binary") == "binary"
  with pytest.raises(ValueError, match="mask_mode='soft'.*reference or binary"):
    preprocess.mask_rule("mvtec", "soft")
  with pytest.raises(ValueError, match="not one of exact, positive, binary"):
    preprocess.preprocess_mask(_square_mask(8, 2), crop(8, 8), "soft")


def test_imagenet_statistics():
  # torchvision's ImageNet normalization, written once in preprocess and used everywhere.
  np.testing.assert_array_equal(MEAN, np.float32([0.485, 0.456, 0.406]))
  np.testing.assert_array_equal(STD, np.float32([0.229, 0.224, 0.225]))


def test_toothbrush_and_wood_rule():
  assert preprocess.class_resize("mvtec", "toothbrush", 288, 288) == 329
  assert preprocess.class_resize("mvtec", "wood", 256, 300) == int(256 * 8 / 7)
  assert preprocess.class_resize("mvtec", "bottle", 288, 300) == 300
  assert preprocess.class_resize("folder", "wood", 288, 288) == 288
  assert preprocess.geometry("mvtec", "wood", 256, 256, "crop") == crop(256, int(256 * 8 / 7))


def test_resize_mode_auto_crops_benchmarks_and_stretches_folders():
  for dataset in ("mvtec", "visa", "mpdd"):
    assert preprocess.geometry(dataset, "x", 32, 40) == crop(32, 40)
  for dataset in ("folder", "demo"):
    assert preprocess.geometry(dataset, "x", 32, 40).mode == "stretch"
  # Explicit modes win; stretch ignores resize and the toothbrush rule.
  assert preprocess.geometry("folder", "x", 32, 40, "crop") == crop(32, 40)
  assert preprocess.geometry("mvtec", "toothbrush", 32, 40, "stretch") == preprocess.Geometry(
      32, 32, "stretch")
  with pytest.raises(ValueError, match="dataset.resize_mode='squash'.*auto, crop, stretch"):
    preprocess.geometry("mvtec", "x", 32, 32, "squash")


def test_stretch_resizes_the_whole_image_by_hand():
  image = _random_image(20, 50)  # H=20, W=50
  stretch = preprocess.geometry("folder", "x", 16, 16)
  resized = np.asarray(image.resize((16, 16), Image.BILINEAR), np.float32)
  np.testing.assert_allclose(preprocess.preprocess_image(image, stretch),
                             (resized / np.float32(255) - MEAN) / STD, rtol=0, atol=1e-6)
  mask = np.zeros((20, 50), np.uint8)
  mask[:, :4] = 255  # at the left border, which a center crop would drop
  by_hand = np.asarray(Image.fromarray(mask).resize((16, 16), Image.NEAREST)) > 0
  out = preprocess.preprocess_mask(Image.fromarray(mask), stretch, "binary")
  np.testing.assert_array_equal(out, by_hand)
  assert out[:, 0].all() and out.sum() > 0
  assert preprocess.preprocess_mask(Image.fromarray(mask), crop(16, 16), "binary").sum() == 0


def test_resize_smaller_than_crop_is_rejected():
  with pytest.raises(ValueError,
                     match=r"dataset.resize \(30\) must be >= dataset.image_size \(32\)"):
    preprocess.geometry("mvtec", "bottle", 32, 30, "crop")


def test_load_image_and_its_errors(tmp_path):
  image = _random_image(30, 40, seed=3)
  image.save(tmp_path / "a.png")
  np.testing.assert_array_equal(preprocess.load_image(tmp_path / "a.png", crop(24, 28)),
                                preprocess.preprocess_image(image, crop(24, 28)))
  with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
    preprocess.load_image(tmp_path / "missing.png", crop(8, 8))
  (tmp_path / "junk.png").write_bytes(b"not an image")
  with pytest.raises(DatasetError,
                     match=r"cannot read image file .*junk.png .*move it out of the folder"):
    preprocess.load_image(tmp_path / "junk.png", crop(8, 8))
  data = (tmp_path / "a.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
  with pytest.raises(DatasetError, match=r"cut.png .*Pillow cannot decode it"):
    preprocess.load_image(tmp_path / "cut.png", crop(8, 8))


@pytest.mark.parity
@pytest.mark.parametrize("h,w,image_size,resize", [(90, 100, 64, 64), (100, 100, 64, 73),
                                                   (45, 70, 32, 40)])
def test_matches_torchvision_reference_transforms(h, w, image_size, resize):
  require(importlib.util.find_spec("torchvision") is not None,
          "torchvision missing: install the convert extra")
  from torchvision import transforms  # pylint: disable=g-import-not-at-top
  image = _random_image(h, w, seed=h + w)
  mask = Image.fromarray(np.asarray(_random_image(h, w, "L", seed=1)) // 128 * 255)
  tf_image = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(),
                                 transforms.Normalize(mean=MEAN.tolist(), std=STD.tolist())])
  tf_mask = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                transforms.ToTensor()])
  np.testing.assert_allclose(preprocess.preprocess_image(image, crop(image_size, resize)),
                             tf_image(image).permute(1, 2, 0).numpy(), rtol=0, atol=1e-6)
  # MVTec: mask.convert('L'), ToTensor, then the metrics' int cast.
  mvtec = tf_mask(mask.convert("L"))[0].numpy().astype(int)
  np.testing.assert_array_equal(
      preprocess.preprocess_mask(mask, crop(image_size, resize), "exact"), mvtec)
  # VisA: mask.convert('F'), then torch.where(mask > 0, 1, 0).
  visa = (tf_mask(mask.convert("F"))[0].numpy() > 0)
  np.testing.assert_array_equal(
      preprocess.preprocess_mask(mask, crop(image_size, resize), "positive"), visa)
