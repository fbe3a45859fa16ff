"""resize_mode on non-square images: stretch keeps every defect, crop reports what it removes."""
import pytest

import data_trees
from pbas_jax import data

DEFECTS = data_trees.NONSQUARE_DEFECTS


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("nonsquare")
  return data_trees.nonsquare_tree(tmp / "raw"), tmp / "tfds"


def _defective(source) -> dict:
  """Defect name -> example, for the defective images of a split."""
  examples = [source[i] for i in range(len(source))]
  return {e["filename"].rsplit("/", 1)[1][:-4]: e for e in examples if e["label"]}


@pytest.mark.parametrize("mask_mode", ["reference", "binary"])
def test_stretch_keeps_every_defect_pixel(tree, mask_mode):
  root, tfds_dir = tree
  size = 64
  test = data.load_split("folder", root, "part", "test", data_dir=tfds_dir, image_size=size,
                         resize=size, mask_mode=mask_mode)  # folder: auto = stretch
  assert test.geometry == data.Geometry(size, size, "stretch")
  defective = _defective(test)
  assert sorted(defective) == sorted(DEFECTS)
  for name, ((w, h), (x0, y0, x1, y1)) in DEFECTS.items():
    mask = defective[name]["mask"]
    assert mask.shape == (size, size) and mask.sum() > 0, name
    if mask_mode == "binary":
      # Nearest-neighbour: the box scaled by (S / w, S / h), give or take one row and column.
      ew, eh = (x1 - x0) * size / w, (y1 - y0) * size / h
      assert (ew - 1) * (eh - 1) <= mask.sum() <= (ew + 1) * (eh + 1), (name, mask.sum(), ew * eh)
  report = data.crop_losses(test)
  assert (report.count, report.total, report.removed, report.message()) == (0, 4, [], "")


def test_crop_reports_the_images_that_lose_defect_pixels(tree):
  root, tfds_dir = tree
  test = data.load_split("folder", root, "part", "test", data_dir=tfds_dir, image_size=32,
                         resize=32, resize_mode="crop")
  report = data.crop_losses(test)
  lost = {n: f for n, f in data_trees.NONSQUARE_LOST.items() if f}
  assert (report.count, report.total) == (len(lost), len(DEFECTS))
  assert [f.rsplit("/", 1)[1][:-4] for f, _ in report.worst] == sorted(lost, key=lost.get,
                                                                        reverse=True)
  for f, fraction in report.worst:
    assert fraction == pytest.approx(lost[f.rsplit("/", 1)[1][:-4]]), f
  assert report.removed == ["part/test/defect/top.png"]
  message = report.message()
  assert "cuts defect pixels from 3 of 4 defective images" in message
  assert "cropped away from 1 of them (still labelled defective): part/test/defect/top.png" in message
  assert "resize_mode=stretch" in message
  # The preprocessed masks agree: the removed defect is gone, the kept one whole.
  defective = _defective(test)
  assert defective["top"]["mask"].sum() == 0 and defective["top"]["label"] == 1
  assert all(defective[n]["mask"].sum() > 0 for n in ("center", "left", "right"))


def test_crop_report_of_square_images_that_are_not_cropped(tmp_path):
  root = data_trees.mvtec_tree(tmp_path / "raw", size=(40, 40))
  kw = dict(data_dir=tmp_path / "tfds", image_size=32)
  assert data.crop_losses(data.load_split("mvtec", root, "bottle", "test", resize=32, **kw)) \
      .message() == ""
  # resize 40 > 32 crops 4 pixels on each side; the centred squares of data_trees survive.
  report = data.crop_losses(data.load_split("mvtec", root, "bottle", "test", resize=40, **kw))
  assert (report.count, report.total) == (0, 3)
