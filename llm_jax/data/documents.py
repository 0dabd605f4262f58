"""What every data source gives the pipeline: `Documents`, random-access pieces `(text, ends_document)`.

The containers (`Pieces` in memory, `Subset` of another, `Examples` of a random-access split with giant
examples cut into pieces), the error every reader raises, and the helpers the readers share: local
files by glob, strict UTF-8, the piece length, and a reachability check before any download.
`sources.py` picks the reader for `data.source`; its docstring says what each one reads.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import socket
from typing import Sequence

import numpy as np

from llm_jax.config import DataConfig
from llm_jax.data import textfiles
from llm_jax.data.textfiles import chunk_spans
from llm_jax.errors import UserError

Piece = tuple[str, bool]  # (text, whether it ends its document)


class DataError(UserError):
  """A data source that is missing, empty, unreadable or misconfigured."""


class Documents(Sequence[Piece]):
  """Pieces of documents (or, for data.format alpaca and chat, Conversations) in a fixed order; `name`
  says where they came from, for messages."""

  name: str


@dataclasses.dataclass(frozen=True)
class Pieces(Documents):
  """Pieces held in memory (local files, or a split read in full)."""

  name: str
  pieces: Sequence[Piece]

  def __len__(self) -> int:
    return len(self.pieces)

  def __getitem__(self, index: int) -> Piece:
    return self.pieces[index]


@dataclasses.dataclass(frozen=True)
class Subset(Documents):
  """The pieces of `parent` at `indices` (a held-out or kept part)."""

  name: str
  parent: Documents
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Piece:
    return self.parent[int(self.indices[index])]


class Examples(Documents):
  """Examples of a random-access split (TFDS, Hugging Face), each a piece; giant ones cut via `spans`.

  `spans` is a `SPANS` table of (example, start, stop, last) when examples are cut; one decoded
  example is cached, because the cut pieces of one example are read one after another.
  """

  def __init__(self, name: str, source: Sequence, field: str, spans: np.ndarray | None):
    self.name, self._source, self._field, self._spans = name, source, field, spans
    self._cached: tuple[int, str] | None = None

  def __len__(self) -> int:
    return len(self._spans) if self._spans is not None else len(self._source)

  def __getitem__(self, index: int) -> Piece:
    if self._spans is None:
      return self.text(index), True
    example, start, stop, last = self._spans[index].tolist()
    return self.text(example)[start:stop], last

  def text(self, example: int) -> str:
    if self._cached is None or self._cached[0] != example:
      self._cached = (example, decode(self._source[example][self._field], f"{self.name} example {example}"))
    return self._cached[1]

  def __getstate__(self) -> dict:  # the cache stays behind when pickled into a worker
    return {**self.__dict__, "_cached": None}


SPANS = np.dtype([("example", "<i8"), ("start", "<i8"), ("stop", "<i8"), ("last", "?")])


def cut_examples(examples: Examples, lengths: np.ndarray, max_chars: int) -> Examples:
  """`examples` with every one longer than max_chars characters cut into pieces (`chunk_spans`)."""
  long = np.flatnonzero(lengths > max_chars)
  if not len(long):
    return examples
  cuts = {int(e): chunk_spans(examples.text(int(e)), max_chars) for e in long}
  counts = np.ones(len(lengths), np.int64)
  counts[long] = [len(cuts[int(e)]) for e in long]
  spans = np.zeros(int(counts.sum()), SPANS)
  spans["example"] = np.repeat(np.arange(len(lengths)), counts)
  spans["stop"] = np.repeat(lengths, counts)
  ends = np.cumsum(counts) - 1
  spans["last"][ends] = True
  for e, pieces in cuts.items():
    first = ends[e] - len(pieces) + 1
    spans["start"][first:ends[e] + 1], spans["stop"][first:ends[e] + 1] = zip(*pieces)
  return Examples(examples.name, examples._source, examples._field, spans)


def decode(value: bytes | str, where: str) -> str:
  if isinstance(value, str):
    return value
  try:
    return value.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: invalid UTF-8 at byte offset {e.start}; re-encode the data as UTF-8") from None
  except AttributeError:
    raise DataError(f"{where}: the field is {type(value).__name__}, not text; set data.text_field to a text feature") from None


def chunk_chars(data: DataConfig) -> int:
  if data.chunk_chars < 0:
    raise DataError(f"data.chunk_chars={data.chunk_chars}: expected 0 (auto) or a positive number of characters")
  return data.chunk_chars or 32 * data.seq_len


def files(scheme: str, pattern: str) -> list[pathlib.Path]:
  """The files `pattern` matches, sorted; none is an error that says whether only folders matched."""
  matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  found = [pathlib.Path(p) for p in matches if os.path.isfile(p)]
  if not found:
    hint = f"only directories match; use {pattern.rstrip('/')}/*" if matches else f"check the path (from {os.getcwd()})"
    raise DataError(f"data source {scheme}:{pattern} matches no file; {hint}")
  return found


def read_text(path: pathlib.Path) -> str:
  return textfiles.read_text(path, DataError)


def online(host: str) -> bool:
  """Whether `host` answers: checked before a download (TFDS, the hub), which offline retries for minutes."""
  try:
    socket.create_connection((host, 443), timeout=5).close()
    return True
  except OSError:
    return False
