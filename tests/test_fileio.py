"""atomic_write: whole files or none, the umask's permissions, no temporary files left."""
import os

import numpy as np
import pytest

from pbas_jax import fileio


def test_atomic_write_text_bytes_folders_and_permissions(tmp_path):
  path = tmp_path / "new" / "folder" / "a.txt"
  fileio.atomic_write(path, "héllo\n")
  assert path.read_bytes() == "héllo\n".encode()
  fileio.atomic_write(path, b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"
  umask = os.umask(0)
  os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask
  assert os.listdir(path.parent) == ["a.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "a.txt"
  fileio.atomic_write(path, "old")
  with pytest.raises(TypeError):
    fileio.atomic_write(path, 3)  # neither str nor bytes: fails after the temporary file exists
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_writer_function_streams_into_the_file(tmp_path):
  path = tmp_path / "a.npz"
  fileio.atomic_write(path, lambda f: np.savez(f, x=np.arange(3)))
  np.testing.assert_array_equal(np.load(path)["x"], [0, 1, 2])

  def fails(f):
    f.write(b"half")
    raise OSError("disk full")
  with pytest.raises(OSError, match="disk full"):
    fileio.atomic_write(path, fails)
  np.testing.assert_array_equal(np.load(path)["x"], [0, 1, 2])
  assert os.listdir(tmp_path) == ["a.npz"]
