"""Bad raw data and settings: a DatasetError naming the path and the fix; nothing left behind."""
import shutil

import data_trees
import pytest

from pbas_jax import data
from pbas_jax.data import DatasetError
from pbas_jax.data import DatasetNotFoundError


def _load(dataset, root, class_name, tmp_path, split="test", **kw):
  return data.load_split(dataset, root, class_name, split, data_dir=tmp_path / "tfds",
                         image_size=32, resize=32, **kw)


def _assert_nothing_prepared(tmp_path, name="pbas_mvtec", class_name="bottle"):
  # <data_dir>/<source folder>/pbas_<dataset>/<class>
  for folder in (tmp_path / "tfds").glob(f"*/{name}/{class_name}"):
    assert not any(folder.iterdir()), list(folder.iterdir())


@pytest.fixture
def mvtec(tmp_path):
  return data_trees.mvtec_tree(tmp_path / "raw", "bottle")


def test_missing_root(tmp_path):
  with pytest.raises(DatasetNotFoundError, match=r"dataset.root .*nowhere does not exist .*mvtec"):
    _load("mvtec", tmp_path / "nowhere", "bottle", tmp_path)


def test_missing_class_folder(tmp_path, mvtec):
  with pytest.raises(DatasetNotFoundError,
                     match=r"class folder .*raw/screw does not exist \(found: bottle\)"):
    _load("mvtec", mvtec, "screw", tmp_path)


def test_unknown_class_lists_valid_ones(tmp_path, mvtec):
  with pytest.raises(DatasetError, match=r"mpdd has no class 'bottle'; valid classes: "
                     r"bracket_black, .*metal_plate, tubes"):
    _load("mpdd", mvtec, "bottle", tmp_path)
  with pytest.raises(DatasetError, match=r"not a folder of .*raw holding train/good/; "
                     r"classes found: bottle"):
    _load("folder", mvtec, "bottel", tmp_path)


def test_unknown_dataset(tmp_path, mvtec):
  with pytest.raises(DatasetError, match=r"dataset.name='mvtecad' is not known; choose one of "
                     r"mvtec, visa, mpdd, folder"):
    _load("mvtecad", mvtec, "bottle", tmp_path)


def test_root_pointing_at_the_class_folder(tmp_path, mvtec):
  # A user passing <root>/bottle: its train/ is taken for a class without train/good.
  with pytest.raises(DatasetError, match=r"is not a folder of .*raw/bottle holding train/good/"):
    _load("folder", mvtec / "bottle", "train", tmp_path)


def test_wrong_layout_without_train_good(tmp_path, mvtec):
  (mvtec / "bottle" / "train" / "good").rename(mvtec / "bottle" / "train" / "normal")
  with pytest.raises(DatasetError, match=r"train/good is missing: mvtec expects the MVTec AD "
                     r"layout <root>/<class>/train/good/\*.png"):
    _load("mvtec", mvtec, "bottle", tmp_path)


def test_images_loose_in_test_folder(tmp_path, mvtec):
  shutil.copy(mvtec / "bottle" / "test" / "good" / "000.png", mvtec / "bottle" / "test" / "x.png")
  with pytest.raises(DatasetError, match=r"x.png lies directly in .*test: test images go in "
                     r"test/good/ or test/<defect type>/"):
    _load("mvtec", mvtec, "bottle", tmp_path)


def test_empty_training_set(tmp_path, mvtec):
  for p in (mvtec / "bottle" / "train" / "good").iterdir():
    p.unlink()
  (mvtec / "bottle" / "train" / "good" / "notes.txt").write_text("not an image")
  with pytest.raises(DatasetError, match=r"empty training set: .*train/good holds no image files"):
    _load("mvtec", mvtec, "bottle", tmp_path, split="train")
  _assert_nothing_prepared(tmp_path)


def test_defect_folder_without_masks(tmp_path, mvtec):
  shutil.rmtree(mvtec / "bottle" / "ground_truth" / "crack")
  (mvtec / "bottle" / "ground_truth" / "other").mkdir()
  with pytest.raises(DatasetError, match=r"test/crack has no masks: expected .*ground_truth/crack/"
                     r"<name>_mask.png"):
    _load("mvtec", mvtec, "bottle", tmp_path)


def test_missing_ground_truth_required_for_mvtec_not_folder(tmp_path, mvtec):
  shutil.rmtree(mvtec / "bottle" / "ground_truth")
  with pytest.raises(DatasetError, match=r"ground_truth is missing: mvtec needs a mask for every "
                     r"defective test image"):
    _load("mvtec", mvtec, "bottle", tmp_path)
  assert not _load("folder", mvtec, "bottle", tmp_path).has_masks


def test_missing_and_extra_masks(tmp_path, mvtec):
  gt = mvtec / "bottle" / "ground_truth" / "crack"
  (gt / "001_mask.png").unlink()
  with pytest.raises(DatasetError, match=r"masks in .*ground_truth/crack do not match the images "
                     r"of .*test/crack \(2 masks for 3 images\): images without mask: "
                     r"001.png; masks without image: none"):
    _load("mvtec", mvtec, "bottle", tmp_path)
  shutil.copy(gt / "000_mask.png", gt / "001_mask.png")
  shutil.copy(gt / "000_mask.png", gt / "007_mask.png")
  with pytest.raises(DatasetError, match=r"\(4 masks for 3 images\): images without mask: none; "
                     r"masks without image: 007"):
    _load("mvtec", mvtec, "bottle", tmp_path)


def test_ambiguous_masks(tmp_path, mvtec):
  gt = mvtec / "bottle" / "ground_truth" / "crack"
  shutil.copy(gt / "000_mask.png", gt / "000.png")
  with pytest.raises(DatasetError, match=r"both masks of image 000: keep one"):
    _load("mvtec", mvtec, "bottle", tmp_path)


def test_masks_for_a_defect_type_without_images(tmp_path, mvtec):
  shutil.copytree(mvtec / "bottle" / "ground_truth" / "crack",
                  mvtec / "bottle" / "ground_truth" / "dent")
  with pytest.raises(DatasetError, match=r"masks for defect types without test images: dent"):
    _load("mvtec", mvtec, "bottle", tmp_path)


def test_mask_size_mismatch(tmp_path, mvtec):
  data_trees.write_image(mvtec / "bottle" / "ground_truth" / "crack" / "002_mask.png",
                         data_trees.square_mask((20, 40), 4))
  with pytest.raises(DatasetError, match=r"mask .*crack/002_mask.png is 20x40 but its image "
                     r".*test/crack/002.png is 40x40"):
    _load("mvtec", mvtec, "bottle", tmp_path)
  _assert_nothing_prepared(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_image_leaves_nothing_prepared(tmp_path, mvtec, damage):
  path = mvtec / "bottle" / "test" / "crack" / "001.png"
  content = path.read_bytes()
  path.write_bytes(content[:len(content) // 2] if damage == "truncated" else b"\x00" * 100)
  with pytest.raises(DatasetError, match=r"cannot read image file .*test/crack/001.png .*"
                     r"Pillow cannot decode it .* save or copy it again from where it came "
                     r"from, or move it out of the folder"):
    _load("mvtec", mvtec, "bottle", tmp_path)
  _assert_nothing_prepared(tmp_path)


def test_unprepared_without_root(tmp_path):
  with pytest.raises(DatasetNotFoundError, match=r"mvtec/bottle is not prepared in .*tfds and "
                     r"dataset.root is empty"):
    _load("mvtec", "", "bottle", tmp_path)


def test_bad_settings(tmp_path, mvtec):
  with pytest.raises(ValueError, match=r"dataset.resize \(16\) must be >= dataset.image_size"):
    data.load_split("mvtec", mvtec, "bottle", "test", data_dir=tmp_path, image_size=32, resize=16)
  with pytest.raises(ValueError, match=r"dataset.mask_mode='soft' is not valid"):
    _load("mvtec", mvtec, "bottle", tmp_path, mask_mode="soft")
  with pytest.raises(DatasetError, match=r"dataset.data_dir is empty"):
    data.load_split("mvtec", mvtec, "bottle", "test", data_dir="")
  _assert_nothing_prepared(tmp_path)


@pytest.fixture
def visa(tmp_path):
  return data_trees.visa_tree(tmp_path / "raw", ("candle",))


def test_visa_missing_split_csv(tmp_path, visa):
  (visa / "split_csv" / "1cls.csv").unlink()
  with pytest.raises(DatasetNotFoundError, match=r"split_csv/1cls.csv is missing: VisA is read "
                     r"through its split file"):
    _load("visa", visa, "candle", tmp_path)


def test_visa_csv_columns_and_rows(tmp_path, visa):
  rows = [["candle", "train", "normal", "candle/Data/Images/Normal/train_000.JPG", ""]]
  data_trees.write_visa_csv(visa, rows, header=("object", "split", "label", "image"))
  with pytest.raises(DatasetError, match=r"1cls.csv lacks the columns mask"):
    _load("visa", visa, "candle", tmp_path)
  data_trees.write_visa_csv(visa, rows)
  with pytest.raises(DatasetError, match=r"no rows for class 'pcb1'; it lists: candle"):
    _load("visa", visa, "pcb1", tmp_path)
  with pytest.raises(DatasetError, match=r"has no test rows for class candle"):
    _load("visa", visa, "candle", tmp_path)
  rows.append(["candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", ""])
  data_trees.write_visa_csv(visa, rows)
  with pytest.raises(DatasetError, match=r"anomalous image candle/Data/Images/Anomaly/000.JPG has "
                     r"no mask"):
    _load("visa", visa, "candle", tmp_path)
  rows[-1][-1] = "candle/Data/Masks/Anomaly/999.png"
  data_trees.write_visa_csv(visa, rows)
  with pytest.raises(DatasetNotFoundError, match=r"Masks/Anomaly/999.png \(listed in .*1cls.csv\) "
                     r"does not exist"):
    _load("visa", visa, "candle", tmp_path)
  _assert_nothing_prepared(tmp_path, "pbas_visa", "candle")
