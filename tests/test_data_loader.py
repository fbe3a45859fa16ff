"""Batching: fixed shapes, padding with `valid`, seeded shuffles, index subsets, subsampling."""
import data_trees
import numpy as np
import pytest

from pbas_jax import data


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("loader")
  root = data_trees.mvtec_tree(tmp / "raw", "bottle", test=(("good", 4), ("crack", 3), ("hole", 3)))
  return data.load_split("mvtec", root, "bottle", "test", data_dir=tmp / "tfds", image_size=24,
                         resize=28)


def test_ordered_batches_pad_the_last_one(source):
  out = list(data.batches(source, 4))
  assert len(out) == 3
  for b in out:
    assert b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.float32
    assert b["mask"].shape == (4, 24, 24) and b["mask"].dtype == np.float32
    assert b["label"].shape == b["valid"].shape == b["index"].shape == (4,)
    assert b["filename"].shape == b["defect_type"].shape == (4,)
  assert np.concatenate([b["index"] for b in out]).tolist() == list(range(10)) + [-1, -1]
  last = out[-1]
  assert last["valid"].tolist() == [True, True, False, False]
  assert not last["image"][2:].any() and not last["mask"][2:].any()
  assert last["filename"][2:].tolist() == ["", ""] and not last["has_mask"][2:].any()
  for i in (0, 9):
    row = source[i]
    b = out[i // 4]
    for key in ("image", "mask", "label", "filename", "defect_type"):
      np.testing.assert_array_equal(b[key][i % 4], row[key])


def test_seeded_shuffle_is_reproducible_and_complete(source):
  def order(seed):
    return np.concatenate([b["index"][b["valid"]] for b in data.batches(source, 3, seed=seed)])
  first = order(1)
  np.testing.assert_array_equal(first, order(1))
  assert sorted(first.tolist()) == list(range(10))
  assert first.tolist() != list(range(10))
  assert first.tolist() != order(2).tolist()


def test_index_subset_and_subsampling(source):
  picked = data.subsample_indices(len(source), 0.5, seed=3)
  assert len(picked) == 5 and len(set(picked.tolist())) == 5
  assert picked.tolist() == sorted(picked.tolist())
  np.testing.assert_array_equal(picked, data.subsample_indices(len(source), 0.5, seed=3))
  assert picked.tolist() != data.subsample_indices(len(source), 0.5, seed=4).tolist()
  assert len(data.subsample_indices(len(source), 0.01, seed=0)) == 1
  got = np.concatenate([b["index"][b["valid"]] for b in data.batches(source, 2, indices=picked)])
  np.testing.assert_array_equal(got, picked)
  with pytest.raises(ValueError, match=r"dataset.subsample=0 must be in \(0, 1\]"):
    data.subsample_indices(10, 0, seed=0)
  with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
    next(data.batches(source, 2, indices=[3, 10]))
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    next(data.batches(source, 0))


def test_source_indexing(source):
  assert source[-1]["filename"] == source[len(source) - 1]["filename"]
  with pytest.raises(IndexError, match="index 10 out of range for 10 examples"):
    source[10]


def test_classes():
  assert len(data.classes("mvtec")) == 15 and "toothbrush" in data.classes("mvtec")
  assert data.classes("mpdd") == ["bracket_black", "bracket_brown", "bracket_white", "connector",
                                  "metal_plate", "tubes"]
  assert len(data.classes("visa")) == 12 and data.classes("visa")[-1] == "pipe_fryum"
  with pytest.raises(data.DatasetError, match="classes are the folders of dataset.root: set it"):
    data.classes("folder")
