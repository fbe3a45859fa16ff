"""The real MPDD `metal_plate` class through the TFDS builder (shared data)."""
import numpy as np
import pytest

from pbas_jax import data


@pytest.mark.slow
def test_mpdd_metal_plate(mpdd_root, tmp_path):
  kw = dict(data_dir=tmp_path / "tfds", image_size=288, resize=288)
  train = data.load_split("mpdd", mpdd_root, "metal_plate", "train", **kw)
  test = data.load_split("mpdd", mpdd_root, "metal_plate", "test", **kw)
  assert len(train) == 54 and len(test) == 26 + 81 and test.has_masks
  rows = [b for b in data.batches(test, 16)]
  labels = np.concatenate([b["label"][b["valid"]] for b in rows])
  types = np.concatenate([b["defect_type"][b["valid"]] for b in rows])
  masks = np.concatenate([b["mask"][b["valid"]] for b in rows])
  assert (labels == 0).sum() == 26 and (labels == 1).sum() == 81
  assert set(types[labels == 0]) == {"good"} and set(types[labels == 1]) == {"defective"}
  areas = masks.sum(axis=(1, 2))
  assert (areas[labels == 1] > 0).all() and (areas[labels == 0] == 0).all()
  assert set(np.unique(masks)) <= {0.0, 1.0}
  image = rows[0]["image"]
  assert image.shape == (16, 288, 288, 3) and np.isfinite(image).all()
  # ImageNet normalization of values in [0, 1].
  assert (image >= -data.IMAGENET_MEAN / data.IMAGENET_STD - 1e-5).all()
  assert (image <= (1 - data.IMAGENET_MEAN) / data.IMAGENET_STD + 1e-5).all()
  # The square 512 px images keep every defect pixel at resize == image_size; a 256 crop of the
  # 288 resize cuts the border defects of 7 images (at most 1.3% of a mask).
  report = data.crop_losses(test)
  assert (report.count, report.total) == (0, 81)
  report = data.crop_losses(data.load_split("mpdd", mpdd_root, "metal_plate", "test",
                                            data_dir=kw["data_dir"], image_size=256, resize=288))
  assert (report.count, report.total, report.removed) == (7, 81, [])
  assert 0.01 < report.worst[0][1] < 0.02
