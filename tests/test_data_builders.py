"""TFDS builders on tiny generated trees: counts, labels, mask alignment, reuse and re-preparing."""
import shutil

import data_trees
import numpy as np
from PIL import Image
import pytest

from pbas_jax import data
from pbas_jax.data import builders
from pbas_jax.data import preprocess

MEAN = preprocess.IMAGENET_MEAN
STD = preprocess.IMAGENET_STD


def _normalized_gray(value):
  return (np.float32(value) / np.float32(255) - MEAN) / STD


def _count_reads(monkeypatch):
  """Counts the files read for preparing (only preparing decodes raw files)."""
  calls = []
  original = builders._read_checked

  def counting(*args):
    calls.append(args[1].image)
    return original(*args)

  monkeypatch.setattr(builders, "_read_checked", counting)
  return calls


@pytest.mark.parametrize("dataset,class_name", [("mvtec", "bottle"), ("mpdd", "metal_plate")])
def test_mvtec_layout_counts_labels_and_masks(tmp_path, dataset, class_name):
  root = data_trees.mvtec_tree(tmp_path / "raw", class_name, n_train=3,
                               test=(("good", 2), ("crack", 3), ("hole", 1)))
  kw = dict(data_dir=tmp_path / "tfds", image_size=40, resize=40)
  train = data.load_split(dataset, root, class_name, "train", **kw)
  test = data.load_split(dataset, root, class_name, "test", **kw)
  assert len(train) == 3 and len(test) == 6 and test.has_masks and train.has_masks
  rows = [test[i] for i in range(len(test))]
  # Sorted by defect type then file name, as the reference iterates.
  assert [(r["defect_type"], r["filename"]) for r in rows] == [
      ("crack", f"{class_name}/test/crack/000.png"), ("crack", f"{class_name}/test/crack/001.png"),
      ("crack", f"{class_name}/test/crack/002.png"), ("good", f"{class_name}/test/good/000.png"),
      ("good", f"{class_name}/test/good/001.png"), ("hole", f"{class_name}/test/hole/000.png")]
  assert [int(r["label"]) for r in rows] == [1, 1, 1, 0, 0, 1]
  for r in rows:
    k = int(r["filename"][-7:-4])
    assert r["image"].shape == (40, 40, 3) and r["image"].dtype == np.float32
    np.testing.assert_allclose(r["image"][0, 0], _normalized_gray(data_trees.image_value(k)),
                               atol=1e-6)
    assert r["mask"].shape == (40, 40) and r["mask"].dtype == np.float32 and r["has_mask"]
    side = data_trees.mask_side(k) if r["label"] else 0
    np.testing.assert_array_equal(r["mask"], data_trees.square_mask((40, 40), side, 1))
  assert all(train[i]["mask"].sum() == 0 and train[i]["label"] == 0 for i in range(3))


def test_masks_pair_by_name_not_by_sorted_order(tmp_path):
  # Sorted images: 1.png, 1_a.png; sorted masks: 1_a_mask.png, 1_mask.png.
  base = tmp_path / "raw" / "bottle"
  data_trees.mvtec_tree(tmp_path / "raw", "bottle", test=(("good", 1),))
  for name, value, side in (("1", 50, 4), ("1_a", 90, 10)):
    data_trees.write_image(base / "test" / "cut" / f"{name}.png",
                           data_trees.gray_image((40, 40), value))
    data_trees.write_image(base / "ground_truth" / "cut" / f"{name}_mask.png",
                           data_trees.square_mask((40, 40), side))
  test = data.load_split("mvtec", tmp_path / "raw", "bottle", "test", data_dir=tmp_path / "tfds",
                         image_size=40, resize=40)
  by_name = {test[i]["filename"]: test[i] for i in range(len(test))}
  assert by_name["bottle/test/cut/1.png"]["mask"].sum() == 16
  assert by_name["bottle/test/cut/1_a.png"]["mask"].sum() == 100


def test_grayscale_classes_and_toothbrush_rule(tmp_path):
  root = data_trees.mvtec_tree(tmp_path / "raw", "toothbrush", channels=1, size=(48, 48))
  test = data.load_split("mvtec", root, "toothbrush", "test", data_dir=tmp_path / "tfds",
                         image_size=32, resize=32)
  assert test.geometry.resize == int(32 * 8 / 7)
  row = test[0]  # crack/000: its square of side 2; 48 -> 36 -> crop 32 at offset 2
  assert row["image"].shape == (32, 32, 3)
  np.testing.assert_allclose(row["image"][5, 5], _normalized_gray(data_trees.image_value(0)),
                             atol=1e-6)
  mask = Image.fromarray(data_trees.square_mask((48, 48), 2)).resize((36, 36), Image.BILINEAR)
  np.testing.assert_array_equal(row["mask"], np.asarray(mask)[2:34, 2:34] == 255)


def test_visa_split_csv(tmp_path):
  root = data_trees.visa_tree(tmp_path / "raw", ("candle", "pcb1"), n_train=3, n_normal=2,
                              n_anomaly=2, size=(48, 36))
  kw = dict(data_dir=tmp_path / "tfds", image_size=32, resize=36)
  train = data.load_split("visa", root, "pcb1", "train", **kw)
  test = data.load_split("visa", root, "pcb1", "test", **kw)
  assert len(train) == 3 and len(test) == 4 and test.has_masks
  rows = [test[i] for i in range(4)]
  assert [int(r["label"]) for r in rows] == [0, 0, 1, 1]
  assert [r["defect_type"] for r in rows] == ["good", "good", "anomaly", "anomaly"]
  assert all(r["filename"].startswith("pcb1/") for r in rows)
  for k, r in enumerate(rows[2:]):
    # 48x36 -> 48x36 (shorter side 36), crop 32 at (2, 8): the square's pixels, positive rule.
    mask = Image.fromarray(data_trees.square_mask((48, 36), data_trees.mask_side(k))).convert("F")
    expected = np.asarray(mask.resize((48, 36), Image.BILINEAR))[2:34, 8:40] > 0
    np.testing.assert_array_equal(r["mask"], expected)
    assert r["mask"].sum() > 0
  assert rows[0]["mask"].sum() == 0


def test_folder_without_ground_truth_has_no_masks(tmp_path):
  root = data_trees.mvtec_tree(tmp_path / "raw", "my_part", masks=False)
  test = data.load_split("folder", root, "my_part", "test", data_dir=tmp_path / "tfds",
                         image_size=40, resize=40)
  assert not test.has_masks
  for r in (test[i] for i in range(len(test))):
    assert r["has_mask"] == (r["label"] == 0)
    assert np.isnan(r["mask"]).all() == bool(r["label"])  # unknown, not faked as defect-free
  assert data.classes("folder", root) == ["my_part"]


def test_folder_masks_saved_as_0_1_are_binarized(tmp_path):
  root = data_trees.mvtec_tree(tmp_path / "raw", "part", mask_high=1)
  test = data.load_split("folder", root, "part", "test", data_dir=tmp_path / "tfds",
                         image_size=40, resize=40)
  sides = [data_trees.mask_side(int(r["filename"][-7:-4])) for r in (test[i] for i in range(3))]
  assert [test[i]["mask"].sum() for i in range(3)] == [s * s for s in sides]


def test_folder_without_test_split(tmp_path):
  root = tmp_path / "raw"
  for k in range(2):
    data_trees.write_image(root / "part" / "train" / "good" / f"{k}.png",
                           data_trees.gray_image((20, 20), k))
  kw = dict(data_dir=tmp_path / "tfds", image_size=16, resize=16)
  assert len(data.load_split("folder", root, "part", "train", **kw)) == 2
  with pytest.raises(data.DatasetError,
                     match=r"folder/part has no 'test' split .*<root>/<class>/test/<type>/"):
    data.load_split("folder", root, "part", "test", **kw)


def test_prepared_once_then_reused_and_usable_without_raw_data(tmp_path, monkeypatch):
  root = data_trees.mvtec_tree(tmp_path / "raw", "bottle")
  kw = dict(data_dir=tmp_path / "tfds", image_size=32, resize=32)
  reads = _count_reads(monkeypatch)
  first = data.load_split("mvtec", root, "bottle", "test", **kw)[0]
  assert len(reads) == 8  # 3 train + 5 test images
  again = data.load_split("mvtec", root, "bottle", "train", **kw)
  data.load_split("mvtec", root, "bottle", "test", **kw)
  assert len(reads) == 8 and len(again) == 3
  shutil.rmtree(root)
  offline = data.load_split("mvtec", "", "bottle", "test", **kw)
  np.testing.assert_array_equal(offline[0]["image"], first["image"])


def test_changed_source_or_root_is_prepared_again(tmp_path, monkeypatch):
  root = data_trees.mvtec_tree(tmp_path / "raw", "bottle")
  kw = dict(data_dir=tmp_path / "tfds", image_size=32, resize=32)
  assert len(data.load_split("mvtec", root, "bottle", "train", **kw)) == 3
  reads = _count_reads(monkeypatch)
  data_trees.write_image(root / "bottle" / "train" / "good" / "new.png",
                         data_trees.gray_image((40, 40), 7))
  assert len(data.load_split("mvtec", root, "bottle", "train", **kw)) == 4
  assert len(reads) == 9
  other = tmp_path / "copy"
  shutil.copytree(root, other)
  shutil.rmtree(other / "bottle" / "test" / "crack")
  shutil.rmtree(other / "bottle" / "ground_truth" / "crack")
  assert len(data.load_split("mvtec", other, "bottle", "test", **kw)) == 2
  assert len(reads) == 9 + 6
  assert not list((tmp_path / "tfds").glob("*/pbas_mvtec/bottle/incomplete*"))
  assert len(list((tmp_path / "tfds").glob("*/pbas_mvtec/bottle"))) == 2  # one per root


def test_two_roots_with_one_class_name_keep_a_prepared_copy_each(tmp_path, monkeypatch):
  # Two datasets of one's own, both with a class `part`, prepared into one data_dir (the default
  # cache): neither replaces the other's copy, and an empty root cannot pick one of them.
  first = data_trees.mvtec_tree(tmp_path / "a" / "raw", "part", n_train=3, masks=False)
  second = data_trees.mvtec_tree(tmp_path / "b" / "raw", "part", n_train=4, masks=False)
  kw = dict(data_dir=tmp_path / "tfds", image_size=16, resize=16)
  reads = _count_reads(monkeypatch)
  assert len(data.load_split("folder", first, "part", "train", **kw)) == 3
  assert len(data.load_split("folder", second, "part", "train", **kw)) == 4
  prepared = len(reads)
  assert prepared == 3 + 5 + 4 + 5  # each root's train and test images, once
  for _ in range(2):
    assert len(data.load_split("folder", first, "part", "train", **kw)) == 3
    assert len(data.load_split("folder", second, "part", "train", **kw)) == 4
  assert len(reads) == prepared  # neither was prepared again
  folders = sorted((tmp_path / "tfds").glob("*/pbas_folder/part"))
  assert len(folders) == 2 and folders[0].parent.parent.name.startswith("raw-")
  assert builders.source_dir(kw["data_dir"], first) != builders.source_dir(kw["data_dir"], second)
  with pytest.raises(data.DatasetError, match=r"folder/part is prepared in .* from 2 roots "
                     r"\(.*\) and dataset.root is empty") as err:
    data.load_split("folder", "", "part", "train", **kw)
  assert str(first.resolve()) in str(err.value) and str(second.resolve()) in str(err.value)


def test_preparing_prints_no_tfds_download_chatter(tmp_path, capfd):
  root = data_trees.mvtec_tree(tmp_path / "raw")
  data.load_split("mvtec", root, "bottle", "test", data_dir=tmp_path / "tfds", image_size=32,
                  resize=32)
  out, err = capfd.readouterr()
  # TFDS's own lines for a download (none happens) and its bars naming temporary shuffle files.
  for chatter in ("Downloading and preparing", "Unknown size", "Shuffling", "incomplete.",
                  "Subsequent calls"):
    assert chatter not in out + err, (chatter, out + err)
  assert "preparing mvtec/bottle test" in err  # our one bar per split
