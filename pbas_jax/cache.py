"""The cache folder ($PBAS_JAX_CACHE, default ~/.cache/pbas_jax): what it holds, and pruning the
feature cache, which grows with every class, setting and code version and is never pruned by a run.

    python -m pbas_jax.cache                          # = list: entries, sizes, last use
    python -m pbas_jax.cache prune --older_than=30d   # entries not used for 30 days
    python -m pbas_jax.cache prune --max_size=20GB    # least recently used first, down to 20 GB
    python -m pbas_jax.cache prune --all              # every entry
    python -m pbas_jax.cache prune --all --dry_run    # what would go

An entry is one split's features (`feature_cache`, about 2.3 MB per image at 288 px with
WideResNet50); its age is the time since a run last wrote or read it. A pruned entry is
extracted again by the next run that needs it. Temporary files left by killed writes go with
`--older_than`/`--all` once an hour old (a younger one may be a write in progress). Prepared
datasets (`tfds/`), converted weights and the demo data are listed as totals and never pruned
here: delete those folders by hand if needed (they are remade on first use).
"""
import argparse
import dataclasses
import json
import os
import re
import time
from typing import Sequence

import numpy as np

from pbas_jax import fileio

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Killed writes leave `.<name>.<pid>.<hex>.tmp` (fileio.atomic_write); younger ones may be live.
_TMP_GRACE_S = 3600


@dataclasses.dataclass(frozen=True)
class Entry:
  """One file of the feature cache: an entry (.npz) or a temporary file of an unfinished write."""
  path: str
  size: int
  mtime: float
  what: str  # "<dataset>/<class> <split>", or "unfinished write"

  def age(self, now: float) -> float:
    return now - self.mtime


def _describe(path: str) -> str:
  try:
    with np.load(path) as stored:
      fields = json.loads(str(stored["meta"]))["fields"]
    return f"{fields['dataset']}/{fields['class']} {fields['split']}"
  except (OSError, ValueError, KeyError, EOFError) as e:
    return f"unreadable ({type(e).__name__})"


def entries(directory: str) -> list[Entry]:
  """The feature cache's files in `directory`, least recently used first."""
  if not os.path.isdir(directory):
    return []
  found = []
  for e in os.scandir(directory):
    if e.name.endswith(".npz") or e.name.endswith(".tmp"):
      try:
        st = e.stat()
      except FileNotFoundError:  # pruned or renamed meanwhile
        continue
      what = _describe(e.path) if e.name.endswith(".npz") else "unfinished write"
      found.append(Entry(e.path, st.st_size, st.st_mtime, what))
  return sorted(found, key=lambda entry: (entry.mtime, entry.path))


def _folder_size(path: str) -> int:
  total = 0
  for folder, _, files in os.walk(path):
    for name in files:
      try:
        total += os.lstat(os.path.join(folder, name)).st_size
      except FileNotFoundError:
        pass
  return total


def format_age(seconds: float) -> str:
  for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
    if seconds >= span:
      return f"{seconds / span:.1f}{unit}"
  return f"{max(seconds, 0):.0f}s"


def parse_size(text: str) -> int:
  """'20GB', '500M', '1e9' -> bytes (powers of 1000)."""
  match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
  if not match or match.group(2).lower() not in _UNITS:
    raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 20GB, 500MB, 0")
  return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_age(text: str) -> float:
  """'30d', '12h', '2w', '90m', '45s' -> seconds."""
  match = re.fullmatch(r"\s*([0-9.]+)\s*([smhdw])\s*", text)
  if not match:
    raise argparse.ArgumentTypeError(f"{text!r} is not an age: write e.g. 30d, 12h, 2w")
  return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def listing(cache: str, now: float) -> str:
  """The text of `list`: one line per feature cache file, then totals of the other folders."""
  directory = fileio.features_dir(cache)
  found = entries(directory)
  lines = [f"feature cache {directory}: {fileio.human_size(sum(e.size for e in found))} in "
           f"{len(found)} files (least recently used first)"]
  lines += [f"  {fileio.human_size(e.size):>9}  {format_age(e.age(now)):>7} ago  {e.what:<40} "
            f"{os.path.basename(e.path)}" for e in found]
  if os.path.isdir(cache):
    others = [e for e in os.scandir(cache) if e.is_dir() and e.path != directory]
    for e in sorted(others, key=lambda e: e.name):
      lines.append(f"{e.name + '/':<10} {fileio.human_size(_folder_size(e.path)):>9}  (not pruned "
                   "here)")
    weights = [e for e in os.scandir(cache) if e.is_file() and e.name.endswith(".safetensors")]
    if weights:
      lines.append(f"converted backbone weights: "
                   f"{fileio.human_size(sum(e.stat().st_size for e in weights))} in "
                   f"{len(weights)} files (not pruned here)")
  return "\n".join(lines)


def to_prune(found: Sequence[Entry], now: float, *, older_than: float | None = None,
             max_size: int | None = None, everything: bool = False) -> list[Entry]:
  """The entries a prune removes: all, those unused for `older_than` seconds, and then the least
  recently used until the rest fit in `max_size` bytes. Unfinished writes younger than an hour are
  kept (they may be in progress)."""
  settled = [e for e in found if e.what != "unfinished write" or e.age(now) > _TMP_GRACE_S]
  if everything:
    return list(settled)
  chosen = [e for e in settled if older_than is not None and e.age(now) > older_than]
  if max_size is not None:
    total = sum(e.size for e in found if e not in chosen)
    for e in settled:  # least recently used first
      if total <= max_size:
        break
      if e not in chosen:
        chosen.append(e)
        total -= e.size
  return chosen


def prune(chosen: Sequence[Entry], *, dry_run: bool = False) -> int:
  """Removes the entries (and their lock files); returns the bytes freed."""
  freed = 0
  for e in chosen:
    if not dry_run:
      try:
        os.unlink(e.path)
      except FileNotFoundError:
        continue  # another prune was first
      if e.path.endswith(".npz"):
        try:
          os.unlink(f"{e.path}.lock")
        except FileNotFoundError:
          pass
    freed += e.size
  return freed


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m pbas_jax.cache", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cache_dir", default=None,
                      help="the cache folder (default $PBAS_JAX_CACHE or ~/.cache/pbas_jax)")
  commands = parser.add_subparsers(dest="command")
  commands.add_parser("list", help="entries with sizes and last use (the default)")
  p = commands.add_parser("prune", help="remove feature cache entries")
  p.add_argument("--older_than", type=parse_age, default=None,
                 help="entries not used for this long: 30d, 12h, 2w")
  p.add_argument("--max_size", type=parse_size, default=None,
                 help="then the least recently used until the cache fits: 20GB, 500MB")
  p.add_argument("--all", action="store_true", help="every entry")
  p.add_argument("--dry_run", action="store_true", help="print what would go, remove nothing")
  args = parser.parse_args(argv)
  cache = os.path.expanduser(fileio.cache_dir(args.cache_dir))
  now = time.time()
  if args.command != "prune":
    print(listing(cache, now))
    return
  if not args.all and args.older_than is None and args.max_size is None:
    parser.error("prune needs --older_than, --max_size or --all")
  found = entries(fileio.features_dir(cache))
  chosen = to_prune(found, now, older_than=args.older_than, max_size=args.max_size,
                    everything=args.all)
  verb = "would remove" if args.dry_run else "removed"
  for e in chosen:
    print(f"{verb} {fileio.human_size(e.size):>9}  {format_age(e.age(now)):>7} ago  {e.what:<40} "
          f"{e.path}")
  freed = prune(chosen, dry_run=args.dry_run)
  print(f"{verb} {len(chosen)} of {len(found)} files, {fileio.human_size(freed)}")


if __name__ == "__main__":
  main()
