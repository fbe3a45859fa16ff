"""Metrics against scikit-learn and against direct (slow) implementations of their definitions."""
import bisect

import numpy as np
import pytest
import scipy.ndimage
import sklearn.metrics
from skimage import measure

from pbas_jax import metrics


def _blob_data(seed, n=4, size=24, levels=None):
  """(n, size, size) maps and 0/1 float masks of random blobs; maps are higher inside blobs."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((n, size, size), np.float32)
  for i in range(1, n):  # image 0 stays normal
    for _ in range(rng.integers(1, 4)):
      cy, cx = rng.integers(0, size, 2)
      r = rng.uniform(1.0, 4.0)
      yy, xx = np.mgrid[:size, :size]
      masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.0
  maps = rng.random(masks.shape).astype(np.float32) + 0.25 * masks
  maps = scipy.ndimage.gaussian_filter(maps, sigma=(0, 1, 1))
  if levels:  # quantized scores: many ties between normal and anomalous pixels
    maps = np.round(maps * levels) / levels
  return maps.astype(np.float32), masks


def _slow_aupro(maps, masks, max_fpr=0.3):
  """MVTec AD definition, one threshold at a time over every distinct score."""
  anomalous = masks == 1
  regions = []
  for i in range(len(maps)):
    labels, n = scipy.ndimage.label(anomalous[i], structure=np.ones((3, 3)))
    regions += [(i, labels == k) for k in range(1, n + 1)]
  normal = ~anomalous
  fprs, pros = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    fprs.append((pred & normal).sum() / normal.sum())
    pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
  fprs, pros = np.array(fprs + [1.0]), np.array(pros + [1.0])
  # MVTec's trapezoid(x, y, x_max): interpolate at x_max, then integrate up to it.
  correction = 0.0
  if max_fpr not in fprs:
    ins = bisect.bisect(fprs, max_fpr)
    y_at = pros[ins - 1] + (pros[ins] - pros[ins - 1]) * (max_fpr - fprs[ins - 1]) / (
        fprs[ins] - fprs[ins - 1])
    correction = 0.5 * (y_at + pros[ins - 1]) * (max_fpr - fprs[ins - 1])
  keep = fprs <= max_fpr
  x, y = fprs[keep], pros[keep]
  return (np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction) / max_fpr


def _slow_reference_pro(maps, masks, num_th=200):
  """The authors' compute_pro, with scipy's binary_dilation in place of cv2.dilate."""
  masks = (masks == 1).astype(int)
  min_th, max_th = maps.min(), maps.max()
  delta = (max_th - min_th) / num_th
  rows = []
  for th in np.arange(min_th, max_th, delta):
    binary = maps > th
    pros = []
    for binary_amap, mask in zip(binary, masks):
      dilated = scipy.ndimage.binary_dilation(binary_amap, structure=np.ones((5, 5)))
      for region in measure.regionprops(measure.label(mask)):
        tp = dilated[region.coords[:, 0], region.coords[:, 1]].sum()
        pros.append(tp / region.area)
    inverse = 1 - masks
    rows.append((np.mean(pros), np.logical_and(inverse, binary).sum() / inverse.sum()))
  pro, fpr = np.array([r for r in rows if r[1] < 0.3]).T
  fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min() + 1e-10)
  return sklearn.metrics.auc(fpr, pro)


@pytest.mark.parametrize("seed,levels", [(0, None), (1, None), (2, 20), (3, 7)])
def test_aupro_matches_definition(seed, levels):
  maps, masks = _blob_data(seed, levels=levels)
  assert metrics.aupro(maps, masks) == pytest.approx(_slow_aupro(maps, masks), abs=1e-6)


@pytest.mark.parametrize("seed,levels", [(0, None), (2, 20)])
def test_reference_pro_matches_authors_definition(seed, levels):
  maps, masks = _blob_data(seed, levels=levels)
  got = metrics.aupro_reference(maps, masks)
  assert got == pytest.approx(_slow_reference_pro(maps, masks), abs=1e-6)
  # The dilation and rescaling make it a different number from the standard AUPRO.
  assert got != pytest.approx(metrics.aupro(maps, masks), abs=1e-3)


def _square_masks():
  masks = np.zeros((2, 16, 16), np.float32)
  masks[1, 2:6, 2:4] = 1      # region A: 8 pixels
  masks[1, 9:15, 8:14] = 1    # region B: 36 pixels
  return masks


def test_aupro_known_cases():
  masks = _square_masks()
  assert metrics.aupro(masks, masks) == pytest.approx(1.0)
  assert metrics.aupro(1.0 - masks, masks) == pytest.approx(0.0)
  # Region A fully found, region B missed: PRO averages regions (1/2), not pixels (8/44).
  rng = np.random.default_rng(0)
  maps = 0.5 + 0.4 * rng.random(masks.shape)   # normal pixels spread over (0.5, 0.9)
  maps[masks == 1] = 0.0
  maps[1, 2:6, 2:4] = 2.0
  assert metrics.aupro(maps, masks) == pytest.approx(0.5)
  # Half of region B found (region A missed): 1/4.
  maps[1, 2:6, 2:4] = 0.0
  maps[1, 9:12, 8:14] = 2.0
  assert metrics.aupro(maps, masks) == pytest.approx(0.25)


def test_regions_are_8_connected():
  masks = np.zeros((1, 8, 8), np.float32)
  masks[0, 1:3, 1:3] = 1   # 4 pixels
  masks[0, 3:5, 3:5] = 1   # 4 pixels touching the first only at a corner: the same region
  maps = np.linspace(0.5, 0.9, 64, dtype=np.float32).reshape(1, 8, 8)
  maps[masks == 1] = 0.0
  maps[0, 1:3, 1:3] = 2.0
  assert metrics.aupro(maps, masks) == pytest.approx(0.5)   # 4 of 8 pixels of one region


def test_mask_convention_only_ones_are_anomalous():
  maps, masks = _blob_data(4)
  soft = masks.copy()
  soft[0, :3, :3] = 0.5  # e.g. a resized, unbinarized mask edge: counts as normal
  assert metrics.pixel_auroc(maps, soft) == pytest.approx(metrics.pixel_auroc(maps, masks))
  assert metrics.aupro(maps, soft) == pytest.approx(metrics.aupro(maps, masks))


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_ap_match_sklearn(ties):
  rng = np.random.default_rng(5)
  scores = rng.random(500)
  if ties:
    scores = np.round(scores, 1)
  labels = (rng.random(500) < 0.3).astype(int)
  assert metrics.image_auroc(scores, labels) == pytest.approx(
      sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12)
  assert metrics.image_ap(scores, labels) == pytest.approx(
      sklearn.metrics.average_precision_score(labels, scores), abs=1e-12)
  maps, masks = _blob_data(6, levels=10 if ties else None)
  flat_y, flat_s = masks.ravel().astype(int), maps.ravel()
  assert metrics.pixel_auroc(maps, masks) == pytest.approx(
      sklearn.metrics.roc_auc_score(flat_y, flat_s), abs=1e-12)
  assert metrics.pixel_ap(maps, masks) == pytest.approx(
      sklearn.metrics.average_precision_score(flat_y, flat_s), abs=1e-12)


def test_image_metrics_crafted():
  labels = np.array([1, 0, 1, 0])
  scores = np.array([0.9, 0.8, 0.7, 0.1])
  assert metrics.image_auroc(scores, labels) == pytest.approx(0.75)
  assert metrics.image_ap(scores, labels) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
  assert metrics.image_auroc(labels * 1.0, labels) == 1.0
  assert metrics.image_auroc(1.0 - labels, labels) == 0.0
  assert metrics.image_auroc(np.ones(4), labels) == 0.5


def test_compute_all_reports_every_metric():
  maps, masks = _blob_data(7)
  labels = (masks.reshape(len(masks), -1).max(axis=1) == 1).astype(int)
  out = metrics.compute_all(maps.max(axis=(1, 2)), labels, maps, masks)
  assert out["notes"] == [] and out["pro_variant"] == "standard"
  assert out["p_pro"] == pytest.approx(metrics.aupro(maps, masks))
  assert out["p_auroc"] == pytest.approx(metrics.pixel_auroc(maps, masks))
  ref = metrics.compute_all(maps.max(axis=(1, 2)), labels, maps, masks, pro_variant="reference")
  assert ref["p_pro"] == pytest.approx(metrics.aupro_reference(maps, masks))
  with pytest.raises(ValueError, match="pro_variant"):
    metrics.compute_all(maps.max(axis=(1, 2)), labels, maps, masks, pro_variant="mvtec")


def test_no_masks_and_no_anomalies_give_none_with_reason():
  maps, masks = _blob_data(8)
  out = metrics.compute_all(np.arange(4.0), [0, 0, 1, 1], maps, None)
  assert out["i_auroc"] == 1.0
  assert out["p_auroc"] is None and out["p_ap"] is None and out["p_pro"] is None
  assert any("no ground-truth masks" in n for n in out["notes"])

  out = metrics.compute_all(np.arange(4.0), [0, 0, 0, 0], maps, np.zeros_like(masks))
  assert all(out[k] is None for k in ("i_auroc", "i_ap", "p_auroc", "p_ap", "p_pro"))
  assert any(n.startswith("i_auroc") and "no anomalous image" in n for n in out["notes"])
  assert any(n.startswith("p_pro") and "no anomalous region" in n for n in out["notes"])
  with pytest.raises(metrics.MetricUndefinedError, match="no anomalous image"):
    metrics.image_auroc(np.arange(3.0), [0, 0, 0])


def test_bad_inputs_raise_clear_errors():
  maps, masks = _blob_data(9)
  with pytest.raises(ValueError, match=r"\(N, H, W\)"):
    metrics.aupro(maps, masks[:, :-1])
  maps[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    metrics.pixel_auroc(maps, masks)
