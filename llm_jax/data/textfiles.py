"""Local text and JSONL files read lazily: documents one at a time, and an index of where each piece lies.

`documents(path, ...)` yields a file's documents in order with their byte location, holding one
document in memory at a time (the whole file for text_split=file, a block of lines for blank_line,
a line for JSONL). `FilePieces` is the random-access `Documents` the pipeline shuffles: an index
built in one pass over the files, 24 bytes per piece, from which a piece is read back with one
`pread`. A text piece is an exact byte range of its file; a JSONL piece is a character range of
its line's field, so its line is read and parsed again (the last one is cached, because the pieces
of one long record tend to be read one after another).

So the memory of a run does not grow with its corpus beyond the index (about 3 MB for 1 GB of
8,192-character pieces; 24 MB for 1 GB of 1 KB JSONL records), and the largest single document.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterator, NamedTuple

import numpy as np

from llm_jax.errors import UserError

# One piece: its file, byte range (the JSONL line holding it) and, for JSONL, its characters in the field.
_INDEX_DTYPE = np.dtype([("file", "<u2"), ("start", "<i8"), ("size", "<i4"), ("first", "<i4"), ("stop", "<i4"),
                         ("last", "?"), ("jsonl", "?")], align=False)


_BLOCK_ROWS = 1 << 16


def chunk_spans(text: str, max_chars: int) -> list[tuple[int, int]]:
  """(start, end) of pieces of at most max_chars that tile `text`, cut after a newline in the
  second half of each window when there is one, else at max_chars."""
  spans, start = [], 0
  while len(text) - start > max_chars:
    cut = text.rfind("\n", start + max_chars // 2, start + max_chars)
    end = cut + 1 if cut >= 0 else start + max_chars
    spans.append((start, end))
    start = end
  if start < len(text):
    spans.append((start, len(text)))
  return spans


class _Located(NamedTuple):
  text: str
  start: int  # byte offset in the file
  size: int  # bytes: the document's own (text), or its line's (JSONL)


def _error(error: type[UserError], path: pathlib.Path, offset: int) -> UserError:
  return error(f"{path}: invalid UTF-8 at byte offset {offset}; convert it, e.g. "
               f"iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}")


def _decode(raw: bytes, path: pathlib.Path, offset: int, error: type[UserError]) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _error(error, path, offset + e.start) from None


def _open(path: pathlib.Path, error: type[UserError]):
  try:
    return open(path, "rb")
  except OSError as e:
    raise error(f"cannot read {path}: {e.strerror}; check its permissions") from None


def documents(path: pathlib.Path, kind: str, text_split: str, field: str,
              error: type[UserError]) -> Iterator[_Located]:
  """The non-blank documents of one file, in order (see the module docstring); `kind` is text or jsonl."""
  if kind == "jsonl":
    yield from _jsonl(path, field, error)
  elif text_split == "blank_line":
    yield from _blocks(path, error)
  else:
    text = read_text(path, error)
    if text.strip():
      yield _Located(text, 0, path.stat().st_size)


def read_text(path: pathlib.Path, error: type[UserError]) -> str:
  """A whole file as strict UTF-8."""
  with _open(path, error) as f:
    return _decode(f.read(), path, 0, error)


def _lines(path: pathlib.Path, error: type[UserError]) -> Iterator[tuple[int, int, bytes]]:
  """(line number, byte offset, bytes) of every line, its line break included."""
  offset = 0
  with _open(path, error) as f:
    for number, raw in enumerate(f, 1):
      yield number, offset, raw
      offset += len(raw)


def _blocks(path: pathlib.Path, error: type[UserError]) -> Iterator[_Located]:
  """Runs of lines that are not blank, without the line break after the last."""
  block: list[str] = []
  start = end = 0  # byte range of the block, its last line break excluded
  for _, offset, raw in _lines(path, error):
    line = _decode(raw, path, offset, error)
    if line.strip():
      if not block:
        start = offset
      block.append(line)
      end = offset + len(raw) - (2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0)
    elif block:
      yield _Located(_strip_break("".join(block)), start, end - start)
      block = []
  if block:
    yield _Located(_strip_break("".join(block)), start, end - start)


def _strip_break(text: str) -> str:
  return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _jsonl(path: pathlib.Path, field: str, error: type[UserError]) -> Iterator[_Located]:
  for number, offset, raw in _lines(path, error):
    line = _decode(raw, path, offset, error)
    if not line.strip():
      continue
    text = field_text(line, field, f"{path}:{number}", error)
    if text.strip():
      yield _Located(text, offset, len(raw))


def field_text(line: str, field: str, where: str, error: type[UserError]) -> str:
  try:
    record = json.loads(line.rstrip("\r\n"))
  except json.JSONDecodeError as e:
    raise error(f"{where}: not JSON ({e.msg}); each line must be one JSON object") from None
  text = record.get(field) if isinstance(record, dict) else None
  if not isinstance(text, str):
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise error(f"{where}: no string field {field!r} (found {keys}); set data.text_field")
  return text


class FilePieces:
  """The pieces of local text or JSONL files, by index (a `documents.Documents`); see the module docstring."""

  def __init__(self, name: str, files: list[pathlib.Path], kind: str, text_split: str, field: str, max_chars: int,
               error: type[UserError]):
    if len(files) > np.iinfo(np.uint16).max:
      raise error(f"{name} matches {len(files)} files; join them into fewer than 65,536 or pre-tokenize them "
                  "(llm-jax data tokenize)")
    self.name, self._files, self._field, self._error = name, [str(f) for f in files], field, error
    parts = [_index(i, path, kind, text_split, field, max_chars, error) for i, path in enumerate(files)]
    self._index = np.concatenate(parts) if parts else np.zeros(0, _INDEX_DTYPE)
    self._fds: dict[int, int] = {}
    self._cached: tuple[int, str] | None = None  # (index row of a JSONL line, its field's text)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> tuple[str, bool]:
    entry = self._index[index]
    file, start, size = int(entry["file"]), int(entry["start"]), int(entry["size"])
    if not entry["jsonl"]:
      return self._read(file, start, size).decode("utf-8"), bool(entry["last"])
    key = (file, start)
    if self._cached is None or self._cached[0] != key:
      self._cached = (key, field_text(self._read(file, start, size).decode("utf-8"), self._field, self._files[file],
                                      self._error))
    return self._cached[1][int(entry["first"]):int(entry["stop"])], bool(entry["last"])

  def _read(self, file: int, start: int, size: int) -> bytes:
    if file not in self._fds:
      self._fds[file] = os.open(self._files[file], os.O_RDONLY)
    return os.pread(self._fds[file], size, start)

  def __getstate__(self) -> dict:  # file descriptors and the cache stay behind when pickled into a worker
    return {**self.__dict__, "_fds": {}, "_cached": None}

  def __del__(self) -> None:
    for fd in getattr(self, "_fds", {}).values():
      os.close(fd)


def _index(file: int, path: pathlib.Path, kind: str, text_split: str, field: str, max_chars: int,
           error: type[UserError]) -> np.ndarray:
  """The index rows of one file's pieces, in order (built a block at a time: a list of tuples takes 6x the room)."""
  blocks, rows = [], []
  for doc in documents(path, kind, text_split, field, error):
    if len(rows) >= _BLOCK_ROWS:
      blocks.append(np.array(rows, _INDEX_DTYPE))
      rows = []
    spans = chunk_spans(doc.text, max_chars)
    if kind == "jsonl":
      rows += [(file, doc.start, doc.size, a, b, i == len(spans) - 1, True) for i, (a, b) in enumerate(spans)]
      continue
    offset = doc.start
    for i, (a, b) in enumerate(spans):
      piece = doc.text[a:b]
      size = len(piece) if piece.isascii() else len(piece.encode("utf-8"))
      rows.append((file, offset, size, 0, 0, i == len(spans) - 1, False))
      offset += size
  return np.concatenate(blocks + [np.array(rows, _INDEX_DTYPE)])
