"""File checksums of a checkpoint: written as its save completes, verified before it is read.

Why: neither orbax nor TensorStore notices a flipped byte inside an array file; a restore then
returns wrong numbers (NaN, or plausible ones) and a resumed run trains on them. So every save
ends by writing `checksums.json` (size and SHA-256 of each file of the listed items) into the
checkpoint, and every restore first compares the files against it. A checkpoint without the
file is not complete: it is written last, inside orbax's temporary folder, so a finished save
always has one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Iterable

MANIFEST = "checksums.json"
_verified: set[tuple] = set()  # (folder, every file's size and mtime) already found intact in this process


def _files(folder: pathlib.Path, items: Iterable[str]) -> list[pathlib.Path]:
  found = []
  for item in items:
    path = folder / item
    found += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
  return found


def _digest(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write(folder: str | pathlib.Path, items: Iterable[str]) -> None:
  """Writes `folder/checksums.json` for every file under the items (subfolders or files) named."""
  folder = pathlib.Path(folder)
  files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _digest(p)}
           for p in _files(folder, items)}
  tmp = folder / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
  os.replace(tmp, folder / MANIFEST)


def damage(folder: str | pathlib.Path) -> str | None:
  """Why the files in `folder` differ from its checksums.json, or None when all match."""
  folder = pathlib.Path(folder)
  try:
    listed = json.loads((folder / MANIFEST).read_text())["files"]
  except FileNotFoundError:
    return f"it has no {MANIFEST} (its save did not finish)"
  except (ValueError, KeyError, TypeError):
    return f"its {MANIFEST} is unreadable"
  stats = []
  for name, expected in sorted(listed.items()):
    path = folder / name
    if not path.is_file():
      return f"its file {name} is missing"
    stat = path.stat()
    if stat.st_size != expected["size"]:
      return f"its file {name} has {stat.st_size} bytes instead of {expected['size']} (truncated or overwritten)"
    stats.append((name, stat.st_size, stat.st_mtime_ns))
  key = (str(folder.absolute()), tuple(stats))
  if key in _verified:
    return None
  for name, expected in sorted(listed.items()):
    if _digest(folder / name) != expected["sha256"]:
      return f"its file {name} does not match its checksum (the bytes on disk changed after the save)"
  _verified.add(key)
  return None
