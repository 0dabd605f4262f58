"""Rows of one slot after another: pieces -> tokens -> packed [R, L] rows with segments and masks.

How rows are made. Row slot r of the global batch (r < B) is a stream of its own: it reads the
pieces at positions r, r + B, r + 2B, ... of the ordered piece sequence, tokenizes each, appends
eos after a document's last piece, and cuts the concatenation into consecutive rows of exactly L
tokens. The ordered sequence is the pieces in a new seeded permutation every epoch (train,
`grain.MapDataset.shuffle` + `repeat`) or in their order, cycled (eval). A document longer than
the room left in a row continues in the same slot of the next batch, as a new segment whose
positions restart at 0: its first part is not visible there (another row), and positions that
start at 0 match what the model sees at inference and never exceed L (learned position tables
have exactly max_len entries). Nothing is dropped and nothing padded; epochs run on forever.

Instruction examples (data.format alpaca or chat) go through the same streams, but whole: slot r
reads examples r, r + B, ... (rendered by the template and tokenized by `examples.encode`, each cut
to at most L tokens from the prompt side) and puts into a row every example that still fits whole;
the next one starts the slot's next row, and the rest of the row is padding (segment 0, input
pad_id, loss_mask 0). So an example never continues into another row, and a slot's state is just
the number of examples it has consumed (its offset stays 0). Every example is rendered and
tokenized once before the first batch: a bad record fails at once, and the examples that had to
be cut are counted exactly (`BatchIterator.truncated`, logged once).

Classification (data.format=classification, `records.Sentence`s) packs the same way: an example is
the sentence's tokens + eos (cut to its last L tokens when longer), and the batch gains

  labels       int32    the example's class at its last token (the eos), -1 everywhere else

with loss_mask all 0 (no token is predicted). `one_pass` reads a split once, each example exactly
once, for a test set's accuracy.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from llm_jax.data import documents, examples, records, templates
from llm_jax.data.documents import DataError
from llm_jax.data.tokenizer import Tokenizer


class _Stream:
  """One row slot: it is on its `piece`-th piece (of those at r, r + B, ...), `offset` tokens into it."""

  __slots__ = ("row", "piece", "offset", "pending")

  def __init__(self, row: int):
    self.row, self.piece, self.offset = row, 0, 0
    self.pending: collections.deque[np.ndarray] = collections.deque()  # tokens of pieces piece, piece + 1, ...

  def buffered(self) -> int:
    return sum(len(ids) for ids in self.pending) - self.offset


class RowsIterator(grain.DatasetIterator):
  """Builds the rows of `streams` for one batch after another (see the module docstring)."""

  def __init__(self, docs: grain.MapDataset, tokenizer: Tokenizer, rows: Sequence[int], batch_size: int, seq_len: int):
    super().__init__()
    self._docs, self._tokenizer, self._B, self._L = docs, tokenizer, batch_size, seq_len
    self._streams = [_Stream(row) for row in rows]

  @property
  def streams(self) -> list[_Stream]:
    """One per row slot, in the order of `rows`."""
    return self._streams

  def __next__(self) -> dict[str, np.ndarray]:
    return batch_fields(*self.rows_of(self._streams))

  def rows_of(self, streams: list[_Stream]) -> tuple[np.ndarray, ...]:
    """The next row of each of `streams` (some of this iterator's): token ids, segment ids[, trained]."""
    self._tokenize_ahead(streams)
    return self._take_rows(streams)

  def _tokenize_ahead(self, streams: list[_Stream]) -> None:
    """Tokenizes, a batch of pieces per call, until every stream holds a full row."""
    while short := [s for s in streams if s.buffered() < self._L]:
      items = [self._docs[s.row + (s.piece + len(s.pending)) * self._B] for s in short]
      for stream, tokens in zip(short, self._tokenize(items)):
        stream.pending.append(tokens)

  def _tokenize(self, pieces: list[documents.Piece]) -> list[np.ndarray]:
    ids = self._tokenizer.encode_batch([text for text, _ in pieces])
    eos = np.int32(self._tokenizer.eos_id)
    return [np.append(piece, eos) if ends else piece for piece, (_, ends) in zip(ids, pieces)]

  def _take_rows(self, streams: list[_Stream]) -> tuple[np.ndarray, np.ndarray]:
    inputs_RL = np.empty((len(streams), self._L), np.int32)
    segments_RL = np.empty_like(inputs_RL)
    for i, stream in enumerate(streams):
      filled, segment = 0, 1
      while filled < self._L:
        ids = stream.pending[0]
        n = min(self._L - filled, len(ids) - stream.offset)
        inputs_RL[i, filled:filled + n] = ids[stream.offset:stream.offset + n]
        segments_RL[i, filled:filled + n] = segment
        filled, segment, stream.offset = filled + n, segment + 1, stream.offset + n
        if stream.offset == len(ids):
          stream.pending.popleft()
          stream.piece, stream.offset = stream.piece + 1, 0
    return inputs_RL, segments_RL

  def get_state(self) -> dict[str, Any]:
    """{"streams": {global row: [piece, offset]}}: keyed by row, so any process layout can resume it."""
    return {"streams": {str(s.row): [s.piece, s.offset] for s in self._streams}}

  def set_state(self, state: dict[str, Any]) -> None:
    streams = state["streams"]
    missing = [s.row for s in self._streams if str(s.row) not in streams]
    if missing:
      raise DataError(f"data iterator state has no position for row {missing[0]} of the batch; it was saved by "
                      "another train.batch_size: resume with the saved one")
    for stream in self._streams:
      stream.piece, stream.offset = map(int, streams[str(stream.row)])
      stream.pending.clear()


class _TokenRowsIterator(RowsIterator):
  """Rows of pieces tokenized ahead of time (tokens:DIR): each already int32 ids, eos included."""

  def _tokenize(self, pieces: list[np.ndarray]) -> list[np.ndarray]:
    return pieces


class _ExampleRowsIterator(RowsIterator):
  """Rows of whole instruction examples, padded (see the module docstring).

  A stream's pending entries are `examples.Tokens`, each at most L long; the row is complete once
  the pending ones hold L tokens or more, since then the next one that does not fit is known.
  """

  def __init__(self, docs: grain.MapDataset, tokenizer: Tokenizer, rows: Sequence[int], batch_size: int, seq_len: int,
               template: templates.Template):
    super().__init__(docs, tokenizer, rows, batch_size, seq_len)
    self._template = template
    self._pad_id = pad_id(tokenizer)

  def _tokenize(self, conversations: list[templates.Conversation]) -> list[examples.Tokens]:
    return examples.encode(conversations, self._template, self._tokenizer, self._L)

  def _take_rows(self, streams: list[_Stream]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inputs_RL = np.full((len(streams), self._L), self._pad_id, np.int32)
    segments_RL = np.zeros_like(inputs_RL)
    trained_RL = np.zeros(inputs_RL.shape, bool)
    for i, stream in enumerate(streams):
      filled, segment = 0, 1
      while stream.pending and filled + len(stream.pending[0]) <= self._L:
        tokens = stream.pending.popleft()
        n = len(tokens)
        inputs_RL[i, filled:filled + n] = tokens.ids
        segments_RL[i, filled:filled + n] = segment
        trained_RL[i, filled:filled + n] = tokens.trained
        filled, segment, stream.piece = filled + n, segment + 1, stream.piece + 1
    return inputs_RL, segments_RL, trained_RL


@dataclasses.dataclass(frozen=True)
class _Labelled:
  """One classification example's tokens (eos last) and its class."""

  ids: np.ndarray  # int32 [N]
  label: int
  cut: bool = False  # it was longer than seq_len and lost its start

  def __len__(self) -> int:
    return len(self.ids)


def encode_sentences(sentences: Sequence[records.Sentence], tokenizer: Tokenizer, seq_len: int) -> list[_Labelled]:
  """Each sentence's tokens + eos, keeping the last seq_len (the eos and the label stay); one tokenizer call."""
  eos = np.int32(tokenizer.eos_id)
  out = []
  for ids, sentence in zip(tokenizer.encode_batch([s.text for s in sentences]), sentences):
    ids = np.append(np.asarray(ids, np.int32), eos)
    out.append(_Labelled(ids[-seq_len:], sentence.label, len(ids) > seq_len))
  return out


def fill_row(pending: collections.deque, inputs_L: np.ndarray, segments_L: np.ndarray, labels_L: np.ndarray) -> int:
  """Moves every example at the head of `pending` that still fits whole into the (padded) row; returns how many."""
  filled, taken = 0, 0
  while pending and filled + len(pending[0]) <= len(inputs_L):
    example = pending.popleft()
    n = len(example)
    inputs_L[filled:filled + n] = example.ids
    segments_L[filled:filled + n] = taken + 1
    labels_L[filled + n - 1] = example.label
    filled, taken = filled + n, taken + 1
  return taken


def classification_fields(inputs_BL: np.ndarray, segments_BL: np.ndarray,
                          labels_BL: np.ndarray) -> dict[str, np.ndarray]:
  """The batch dict of packed classification rows: `batch_fields` with loss_mask 0 and `labels`."""
  fields = batch_fields(inputs_BL, segments_BL)
  fields["loss_mask"] = np.zeros_like(fields["loss_mask"])
  fields["labels"] = labels_BL
  return fields


class _SentenceRowsIterator(RowsIterator):
  """Rows of whole classification examples, padded; a slot's state is the examples it consumed."""

  def __init__(self, docs: grain.MapDataset, tokenizer: Tokenizer, rows: Sequence[int], batch_size: int, seq_len: int):
    super().__init__(docs, tokenizer, rows, batch_size, seq_len)
    self._pad_id = pad_id(tokenizer)

  def _tokenize(self, sentences: list[records.Sentence]) -> list[_Labelled]:
    return encode_sentences(sentences, self._tokenizer, self._L)

  def __next__(self) -> dict[str, np.ndarray]:
    self._tokenize_ahead(self._streams)
    inputs_RL = np.full((len(self._streams), self._L), self._pad_id, np.int32)
    segments_RL = np.zeros_like(inputs_RL)
    labels_RL = np.full_like(inputs_RL, -1)
    for i, stream in enumerate(self._streams):
      stream.piece += fill_row(stream.pending, inputs_RL[i], segments_RL[i], labels_RL[i])
    return classification_fields(inputs_RL, segments_RL, labels_RL)


class PackedRows(grain.IterDataset):
  """The rows of slots `rows`; a grain worker narrows them to its share through `set_slice`."""

  def __init__(self, docs: grain.MapDataset, tokenizer: Tokenizer, rows: Sequence[int], batch_size: int, seq_len: int,
               template: templates.Template | str | None = None):
    super().__init__(docs)
    self._docs, self._tokenizer, self._rows = docs, tokenizer, tuple(rows)
    self._B, self._L, self._template = batch_size, seq_len, template

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice  # a worker's rows are a strided share either way: the batch is the same
    self._rows = self._rows[sl]

  def __iter__(self) -> RowsIterator:
    if self._template is None:
      return RowsIterator(self._docs, self._tokenizer, self._rows, self._B, self._L)
    if self._template == "tokens":
      return _TokenRowsIterator(self._docs, self._tokenizer, self._rows, self._B, self._L)
    if self._template == "classification":
      return _SentenceRowsIterator(self._docs, self._tokenizer, self._rows, self._B, self._L)
    return _ExampleRowsIterator(self._docs, self._tokenizer, self._rows, self._B, self._L, self._template)


def pad_id(tokenizer: Tokenizer) -> int:
  """The input id of padding: the tokenizer's pad, or its eos when it has none (the loss masks either)."""
  pad = getattr(tokenizer, "pad_id", None)
  return pad if isinstance(pad, int) and pad >= 0 else tokenizer.eos_id


def batch_fields(inputs_BL: np.ndarray, segments_BL: np.ndarray,
                 trained_BL: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The batch dict (module docstring) from packed token ids and their segment ids; with `trained_BL`
  (instruction examples), the loss mask keeps only targets that are trained tokens."""
  B, L = inputs_BL.shape
  starts_BL = np.ones((B, L), bool)
  starts_BL[:, 1:] = segments_BL[:, 1:] != segments_BL[:, :-1]
  index_BL = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
  positions_BL = index_BL - np.maximum.accumulate(np.where(starts_BL, index_BL, 0), axis=1)
  targets_BL = np.zeros_like(inputs_BL)
  targets_BL[:, :-1] = inputs_BL[:, 1:]
  loss_mask_BL = np.zeros((B, L), np.float32)
  loss_mask_BL[:, :-1] = ~starts_BL[:, 1:] & (segments_BL[:, :-1] != 0)
  if trained_BL is not None:
    loss_mask_BL[:, :-1] *= trained_BL[:, 1:]
  return {"inputs": inputs_BL, "targets": targets_BL, "segment_ids": segments_BL,
          "positions": positions_BL.astype(np.int32), "loss_mask": loss_mask_BL}
