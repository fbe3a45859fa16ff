"""Files: the user's cache folder, and writing so that a reader (another process, a resumed run)
never sees half of a file."""
import os
import secrets
import tempfile
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike,
                 data: str | bytes | Callable[[BinaryIO], None]) -> None:
  """Writes `data` to `path` through a temporary file in the same folder and a rename.

  Args:
    path: the file; its folder is created.
    data: text (written as UTF-8), bytes, or a function that writes to the open binary file
      (for large files, e.g. `lambda f: np.savez(f, **arrays)`, without a copy in memory).

  The file gets the permissions a plain `open` would give it (the umask applies), so shared
  caches stay readable by others. On any error the temporary file is removed and `path` keeps its
  old content.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


class NotWritableError(PermissionError):
  """A folder where a run must write cannot be written; the message names it and the setting."""


def check_writable(folder: str | os.PathLike, setting: str) -> None:
  """Makes `folder` and writes and removes a file in it, so that a read-only or unmakeable folder
  fails before any work instead of at the first write; `setting` names it ("--workdir")."""
  try:
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_check.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise NotWritableError(f"{setting} {folder} is not writable ({type(e).__name__}: "
                           f"{e.strerror or e}): choose another {setting} or fix its "
                           "permissions") from e


def cache_dir(override: str | os.PathLike | None = None) -> str:
  """Where prepared data, converted weights and cached features live: `override`, else
  $PBAS_JAX_CACHE, else ~/.cache/pbas_jax ("" counts as unset). Shared by every run and sweep task
  of a user."""
  return os.fspath(override or os.environ.get("PBAS_JAX_CACHE")
                   or os.path.expanduser("~/.cache/pbas_jax"))


def features_dir(override: str | os.PathLike | None = None) -> str:
  """Where `feature_cache` keeps its entries: `<cache folder>/features` (`python -m
  pbas_jax.cache` lists and prunes them)."""
  return os.path.join(os.path.expanduser(cache_dir(override)), "features")


def human_size(size: float) -> str:
  """Bytes for people: '512 B', '2.3 MB', '43.0 GB' (powers of 1000, as `du --si`)."""
  for unit in ("B", "kB", "MB", "GB", "TB"):
    if abs(size) < 1000 or unit == "TB":
      return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
    size /= 1000
