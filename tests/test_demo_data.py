"""The embedded demo dataset: MVTec layout, counts, masks, determinism, idempotence."""
import json
import pathlib

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from pbas_jax.data import demo

SMALL = dict(image_size=64, n_train=3, n_test_good=2, n_test_defect=2)


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
  return demo.make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=3, **SMALL)


def test_layout_and_counts(tree):
  assert sorted(p.name for p in tree.iterdir()) == sorted(demo.CLASSES)
  for name, (_, defects) in demo.CLASSES.items():
    cls = tree / name
    assert len(list((cls / "train" / "good").glob("*.png"))) == SMALL["n_train"]
    assert len(list((cls / "test" / "good").glob("*.png"))) == SMALL["n_test_good"]
    assert sorted(p.name for p in (cls / "test").iterdir()) == sorted(["good", *defects])
    assert sorted(p.name for p in (cls / "ground_truth").iterdir()) == sorted(defects)
    for defect in defects:
      images = sorted((cls / "test" / defect).glob("*.png"))
      masks = sorted((cls / "ground_truth" / defect).glob("*.png"))
      assert len(images) == SMALL["n_test_defect"]
      assert [m.name for m in masks] == [f"{i.stem}_mask.png" for i in images]
      for image_path, mask_path in zip(images, masks):
        image, mask = Image.open(image_path), np.asarray(Image.open(mask_path))
        assert image.mode == "RGB" and image.size == (64, 64)
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}


def test_saved_files_are_the_rendered_samples(tree):
  # Class 1 (woven), split 2 (the first defect type), index 1.
  defect = list(demo.CLASSES["woven"][1])[0]
  image, mask = demo.render("woven", defect, (3, 1, 2, 1), 64)
  np.testing.assert_array_equal(np.asarray(Image.open(tree / f"woven/test/{defect}/001.png")),
                                image)
  np.testing.assert_array_equal(
      np.asarray(Image.open(tree / f"woven/ground_truth/{defect}/001_mask.png")), mask * 255)


@pytest.mark.parametrize("name", sorted(demo.CLASSES))
def test_defects_are_visible_sized_and_inside_their_masks(name):
  for defect in demo.CLASSES[name][1]:
    for i in range(3):
      seed = (0, 7, 1, i)
      image, mask = demo.render(name, defect, seed, 128)
      clean, empty = demo.render(name, None, seed, 128)
      assert not empty.any()
      # Neither trivially tiny nor whole-image (at 128 px: > 40 px and < 8 %).
      assert 40 < mask.sum() < 0.08 * mask.size, (defect, i, mask.sum())
      diff = np.abs(image.astype(int) - clean.astype(int)).max(-1)
      # Only the anti-aliased border may leak out of the mask.
      assert diff[~ndimage.binary_dilation(mask, iterations=3)].max() == 0, (defect, i)
      assert diff[mask].mean() > 20, (defect, i, diff[mask].mean())


def test_deterministic_in_the_seed(tree, tmp_path):
  reference = _files(tree)
  assert _files(demo.make_demo_dataset(tmp_path / "a", seed=3, **SMALL)) == reference
  other = _files(demo.make_demo_dataset(tmp_path / "b", seed=4, **SMALL))
  assert other.keys() == reference.keys()
  # Every image differs with another seed (the masks of two blobs may coincide, rarely).
  images = [k for k in reference if k.endswith(".png") and "ground_truth" not in k]
  assert all(other[k] != reference[k] for k in images)


def test_idempotent_and_refuses_other_settings(tmp_path):
  root = demo.make_demo_dataset(tmp_path, seed=1, classes=("woven",), **SMALL)
  before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
  assert demo.make_demo_dataset(tmp_path, seed=1, classes=("woven",), **SMALL) == root
  assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
  assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left
  assert json.loads((root / "woven" / ".demo.json").read_text())["seed"] == 1
  with pytest.raises(ValueError, match="made with"):
    demo.make_demo_dataset(tmp_path, seed=2, classes=("woven",), **SMALL)
  (tmp_path / "brushed_metal").mkdir()  # a folder that is not a demo tree
  with pytest.raises(ValueError, match="not a demo dataset"):
    demo.make_demo_dataset(tmp_path, seed=1, classes=("brushed_metal",), **SMALL)


def test_bad_settings(tmp_path):
  with pytest.raises(ValueError, match="image_size"):
    demo.make_demo_dataset(tmp_path, image_size=32)
  with pytest.raises(ValueError, match="unknown classes"):
    demo.make_demo_dataset(tmp_path, classes=("carpet",))
  with pytest.raises(ValueError, match="unknown defect"):
    demo.render("woven", "scratch", (0,), 64)
