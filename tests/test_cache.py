"""`python -m pbas_jax.cache`: listing and pruning the feature cache; the cache's log lines."""
import errno
import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from pbas_jax import cache
from pbas_jax import feature_cache
from pbas_jax import fileio

DAY = 86400


def _fields(class_name: str, split: str = "train") -> dict:
  return {"dataset": "folder", "class": class_name, "split": split}


def _split(n: int) -> feature_cache.Split:
  return feature_cache.Split(features=np.ones((n, 2, 2, 8), np.float32),
                             labels=np.zeros(n, np.int64), masks=None,
                             names=[f"good/{k}" for k in range(n)], defect_types=["good"] * n,
                             images=np.zeros(0, np.float32))


def _entry(directory, class_name: str, n: int, days_old: float) -> str:
  """A real cache entry written as a run writes it, last used `days_old` days ago."""
  fields = _fields(class_name)
  path = feature_cache.entry_path(str(directory), fields)
  feature_cache._write(path, _split(n), fields)
  open(f"{path}.lock", "w").close()
  stamp = time.time() - days_old * DAY
  os.utime(path, (stamp, stamp))
  return path


@pytest.fixture
def filled(tmp_path):
  """A cache folder with three entries (1, 10 and 40 days unused), prepared data and weights."""
  features = tmp_path / "features"
  paths = {name: _entry(features, name, n, days) for name, n, days in
           (("new", 10, 1), ("mid", 20, 10), ("old", 30, 40))}
  (tmp_path / "tfds" / "raw-0123456789").mkdir(parents=True)
  (tmp_path / "tfds" / "raw-0123456789" / "x.array_record").write_bytes(b"0" * 5000)
  (tmp_path / "lite0-imagenet.safetensors").write_bytes(b"0" * 7000)
  return tmp_path, paths


def _run(capsys, *args) -> str:
  cache.main(list(args))
  return capsys.readouterr().out


def test_list_shows_entries_sizes_ages_and_other_folders(filled, capsys):
  root, paths = filled
  out = _run(capsys, "--cache_dir", str(root), "list")
  lines = out.splitlines()
  total = sum(os.path.getsize(p) for p in paths.values())
  assert lines[0] == (f"feature cache {root / 'features'}: {fileio.human_size(total)} in 3 files "
                      "(least recently used first)")
  # Least recently used first, each with its size, age and what it holds.
  for line, name, days in zip(lines[1:4], ("old", "mid", "new"), (40, 10, 1)):
    assert line.split()[:4] == [*fileio.human_size(os.path.getsize(paths[name])).split(),
                                f"{days:.1f}d", "ago"], line
    assert f"folder/{name} train" in line and os.path.basename(paths[name]) in line
  assert any(line.startswith("tfds/") and "5.0 kB" in line for line in lines), out
  assert "converted backbone weights: 7.0 kB in 1 files" in out
  assert _run(capsys, "--cache_dir", str(root)) == out  # list is the default


def test_prune_older_than_removes_old_entries_and_their_locks(filled, capsys):
  root, paths = filled
  out = _run(capsys, "--cache_dir", str(root), "prune", "--older_than=7d")
  assert out.splitlines()[-1].startswith("removed 2 of 3 files")
  assert os.path.exists(paths["new"]) and os.path.exists(f"{paths['new']}.lock")
  for name in ("mid", "old"):
    assert not os.path.exists(paths[name]) and not os.path.exists(f"{paths[name]}.lock")


def test_prune_max_size_removes_least_recently_used_until_it_fits(filled, capsys):
  root, paths = filled
  keep = os.path.getsize(paths["new"]) + os.path.getsize(paths["mid"])
  _run(capsys, "--cache_dir", str(root), "prune", f"--max_size={keep}")
  assert [os.path.exists(paths[n]) for n in ("new", "mid", "old")] == [True, True, False]
  _run(capsys, "--cache_dir", str(root), "prune", f"--max_size={keep - 1}")
  assert [os.path.exists(paths[n]) for n in ("new", "mid", "old")] == [True, False, False]


def test_prune_all_dry_run_then_all(filled, capsys):
  root, paths = filled
  stale = root / "features" / ".x.npz.123.abcd.tmp"  # a write killed two hours ago
  live = root / "features" / ".y.npz.456.ef01.tmp"  # a write that may be in progress
  for tmp, hours in ((stale, 2), (live, 0)):
    tmp.write_bytes(b"0" * 100)
    os.utime(tmp, (time.time() - hours * 3600,) * 2)
  out = _run(capsys, "--cache_dir", str(root), "prune", "--all", "--dry_run")
  assert out.count("would remove") == 5 and all(os.path.exists(p) for p in paths.values())
  _run(capsys, "--cache_dir", str(root), "prune", "--all")
  assert sorted(os.listdir(root / "features")) == [live.name]
  assert (root / "tfds").is_dir() and (root / "lite0-imagenet.safetensors").exists()


def test_prune_needs_a_criterion_and_sizes_and_ages_are_checked(filled, capsys):
  root, paths = filled
  for args in ([], ["--older_than=30"], ["--max_size=lots"]):
    with pytest.raises(SystemExit):
      cache.main(["--cache_dir", str(root), "prune", *args])
  assert all(os.path.exists(p) for p in paths.values())
  assert cache.parse_size("20GB") == 20 * 10**9 and cache.parse_size("500m") == 5 * 10**8
  assert cache.parse_age("2w") == 14 * DAY and cache.parse_age("12h") == 12 * 3600


def test_module_runs_on_pbas_jax_cache(filled):
  root, _ = filled
  result = subprocess.run([sys.executable, "-m", "pbas_jax.cache", "prune", "--older_than=30d"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PBAS_JAX_CACHE=str(root)))
  assert result.returncode == 0, result.stderr
  assert "removed 1 of 3 files" in result.stdout


def test_write_logs_size_and_cache_total(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  path = _entry(tmp_path, "part", 10, 0)
  size = fileio.human_size(os.path.getsize(path))
  assert (f"features of folder/part train cached to {path} ({size}; the feature cache {tmp_path} "
          f"holds {size} in 1 entries; `python -m pbas_jax.cache` lists and prunes them)"
          in caplog.text)


def test_failed_write_says_space_needed_and_free(tmp_path, caplog, monkeypatch):
  def full_disk(path, data):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  monkeypatch.setattr(fileio, "atomic_write", full_disk)
  fields = _fields("part")
  path = feature_cache.entry_path(str(tmp_path), fields)
  split = _split(1000)  # 128 kB of features
  feature_cache._write(path, split, fields)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and not os.path.exists(path)
  assert f"could not write the feature cache file {path}" in warnings[0]
  assert "No space left on device" in warnings[0]
  # The size needed is that of every array written: features, labels, names, defect types (all
  # known here) and the key as JSON (under 1 kB).
  arrays = (split.features, split.labels, np.array(split.names), np.array(split.defect_types))
  known = sum(a.nbytes for a in arrays) / 1000
  needed = float(re.search(r"it needs ([0-9.]+) kB", warnings[0]).group(1))
  assert known - 0.05 <= needed <= known + 1, (needed, known)
  assert f" free in {tmp_path}; continuing without it" in warnings[0]
  assert "python -m pbas_jax.cache" in warnings[0]
