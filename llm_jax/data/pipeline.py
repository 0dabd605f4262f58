"""Packed, sharded, resumable batches: documents -> tokens -> rows of seq_len -> global arrays.

Each batch is a dict of [B, L] arrays (B the global batch size, L = data.seq_len):

  inputs       int32    token ids
  targets      int32    the next token in the same row (0 after the last position)
  segment_ids  int32    1, 2, ... for each piece of text (or example) in the row; 0 is padding
  positions    int32    0, 1, ... restarting at the start of every segment
  loss_mask    float32  1 where the target is the next token of the same segment: 0 at the row's end and at
                        every boundary, so no row ever trains one document to predict another; for
                        instruction examples, 1 only where that target is a trained (response) token

How rows are made. Row slot r of the global batch (r < B) is a stream of its own: it reads the
pieces at positions r, r + B, r + 2B, ... of the ordered piece sequence, tokenizes each, appends
eos after a document's last piece, and cuts the concatenation into consecutive rows of exactly L
tokens. The ordered sequence is the pieces in a new seeded permutation every epoch (train,
`grain.MapDataset.shuffle` + `repeat`) or in their order, cycled (eval). A document longer than
the room left in a row continues in the same slot of the next batch, as a new segment whose
positions restart at 0: its first part is not visible there (another row), and positions that
start at 0 match what the model sees at inference and never exceed L (learned position tables
have exactly max_len entries). Nothing is dropped and nothing padded; epochs run on forever.

Why a stream per slot: rows depend only on (data, seed, B, L), never on how many processes,
devices or workers build them. Each process builds just the slots its devices hold (from the
mesh's sharding), so it reads only its share of the data, and the global array is the same as
one process would build; grain workers split a process's slots the same way. The iterator state
is two integers per slot (the piece index and the tokens of it already used), so `set_state`
resumes exactly, without replaying the past.

Instruction examples (data.format alpaca or chat) go through the same streams, but whole: slot r
reads examples r, r + B, ... (rendered by the template and tokenized by `examples.encode`, each cut
to at most L tokens from the prompt side) and puts into a row every example that still fits whole;
the next one starts the slot's next row, and the rest of the row is padding (segment 0, input
pad_id, loss_mask 0). So an example never continues into another row, and a slot's state is just
the number of examples it has consumed (its offset stays 0). Every example is rendered and
tokenized once before the first batch: a bad record fails at once, and the examples that had to
be cut are counted exactly (`BatchIterator.truncated`, logged once).

Classification (data.format=classification, `sources.Sentence`s) packs the same way: an example is
the sentence's tokens + eos (cut to its last L tokens when longer), and the batch gains

  labels       int32    the example's class at its last token (the eos), -1 everywhere else

with loss_mask all 0 (no token is predicted). `one_pass` reads a split once, each example exactly
once, for a test set's accuracy.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import sys
import weakref
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llm_jax import sharding
from llm_jax.config import DataConfig
from llm_jax.data import examples, sources, templates
from llm_jax.data.sources import DataError, Documents
from llm_jax.data.tokenizer import Tokenizer

Batch = dict[str, Any]  # numpy arrays on the host (mesh=None) or global jax.Arrays
_BATCH_AXES = sharding.RULES["batch"]  # the mesh axes the rows are split over
_COUNT_CHUNK = 256  # pieces tokenized per call while counting a split's tokens

log = logging.getLogger(__name__)
_reported_cuts: set[tuple] = set()  # (split, data, seq_len, template) whose truncation count this process logged


class _Stream:
  """One row slot: it is on its `piece`-th piece (of those at r, r + B, ...), `offset` tokens into it."""

  __slots__ = ("row", "piece", "offset", "pending")

  def __init__(self, row: int):
    self.row, self.piece, self.offset = row, 0, 0
    self.pending: collections.deque[np.ndarray] = collections.deque()  # tokens of pieces piece, piece + 1, ...

  def buffered(self) -> int:
    return sum(len(ids) for ids in self.pending) - self.offset


class _RowsIterator(grain.DatasetIterator):
  """Builds the rows of `streams` for one batch after another (see the module docstring)."""

  def __init__(self, docs: grain.MapDataset, tokenizer: Tokenizer, rows: Sequence[int], batch_size: int, seq_len: int):
    super().__init__()
    self._docs, self._tokenizer, self._B, self._L = docs, tokenizer, batch_size, seq_len
    self._streams = [_Stream(row) for row in rows]

  def __next__(self) -> dict[str, np.ndarray]:
    self._tokenize_ahead()
    return batch_fields(*self._take_rows())

  def _tokenize_ahead(self) -> None:
    """Tokenizes, a batch of pieces per call, until every stream holds a full row."""
    while short := [s for s in self._streams if s.buffered() < self._L]:
      items = [self._docs[s.row + (s.piece + len(s.pending)) * self._B] for s in short]
      for stream, tokens in zip(short, self._tokenize(items)):
        stream.pending.append(tokens)

  def _tokenize(self, pieces: list[sources.Piece]) -> list[np.ndarray]:
    ids = self._tokenizer.encode_batch([text for text, _ in pieces])
    eos = np.int32(self._tokenizer.eos_id)
    return [np.append(piece, eos) if ends else piece for piece, (_, ends) in zip(ids, pieces)]

  def _take_rows(self) -> tuple[np.ndarray, np.ndarray]:
    inputs_RL = np.empty((len(self._streams), self._L), np.int32)
    segments_RL = np.empty_like(inputs_RL)
    for i, stream in enumerate(self._streams):
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


class _ExampleRowsIterator(_RowsIterator):
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

  def _take_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inputs_RL = np.full((len(self._streams), self._L), self._pad_id, np.int32)
    segments_RL = np.zeros_like(inputs_RL)
    trained_RL = np.zeros(inputs_RL.shape, bool)
    for i, stream in enumerate(self._streams):
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


def encode_sentences(sentences: Sequence[sources.Sentence], tokenizer: Tokenizer, seq_len: int) -> list[_Labelled]:
  """Each sentence's tokens + eos, keeping the last seq_len (the eos and the label stay); one tokenizer call."""
  eos = np.int32(tokenizer.eos_id)
  out = []
  for ids, sentence in zip(tokenizer.encode_batch([s.text for s in sentences]), sentences):
    ids = np.append(np.asarray(ids, np.int32), eos)
    out.append(_Labelled(ids[-seq_len:], sentence.label, len(ids) > seq_len))
  return out


def _fill_row(pending: collections.deque, inputs_L: np.ndarray, segments_L: np.ndarray, labels_L: np.ndarray) -> int:
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


class _SentenceRowsIterator(_RowsIterator):
  """Rows of whole classification examples, padded; a slot's state is the examples it consumed."""

  def __init__(self, docs: grain.MapDataset, tokenizer: Tokenizer, rows: Sequence[int], batch_size: int, seq_len: int):
    super().__init__(docs, tokenizer, rows, batch_size, seq_len)
    self._pad_id = pad_id(tokenizer)

  def _tokenize(self, sentences: list[sources.Sentence]) -> list[_Labelled]:
    return encode_sentences(sentences, self._tokenizer, self._L)

  def __next__(self) -> dict[str, np.ndarray]:
    self._tokenize_ahead()
    inputs_RL = np.full((len(self._streams), self._L), self._pad_id, np.int32)
    segments_RL = np.zeros_like(inputs_RL)
    labels_RL = np.full_like(inputs_RL, -1)
    for i, stream in enumerate(self._streams):
      stream.piece += _fill_row(stream.pending, inputs_RL[i], segments_RL[i], labels_RL[i])
    return classification_fields(inputs_RL, segments_RL, labels_RL)


class _PackedRows(grain.IterDataset):
  """The rows of slots `rows`; a grain worker narrows them to its share through `set_slice`."""

  def __init__(self, docs: grain.MapDataset, tokenizer: Tokenizer, rows: Sequence[int], batch_size: int, seq_len: int,
               template: templates.Template | str | None = None):
    super().__init__(docs)
    self._docs, self._tokenizer, self._rows = docs, tokenizer, tuple(rows)
    self._B, self._L, self._template = batch_size, seq_len, template

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice  # a worker's rows are a strided share either way: the batch is the same
    self._rows = self._rows[sl]

  def __iter__(self) -> _RowsIterator:
    if self._template is None:
      return _RowsIterator(self._docs, self._tokenizer, self._rows, self._B, self._L)
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


def _parse_absl_flags() -> None:
  """grain reads absl flags when it makes its workers, which fails unless they were parsed (as
  in any program that does not run through absl.app); default values are all it needs."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
  """Hides the `__main__` script while grain spawns its workers.

  Spawn re-runs the main script in every new process unless it is hidden, so a script without
  an `if __name__ == "__main__":` guard would start its training again in each worker (and fail).
  grain ships the pipeline to its workers pickled: they never need the script.
  """
  main = sys.modules["__main__"]
  saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
  main.__dict__.pop("__file__", None)
  main.__spec__ = None  # multiprocessing reads the attribute, so it must exist
  try:
    yield
  finally:
    main.__dict__.update(saved)


class _MergedParts(grain.IterDataset):
  """Reassembles the row shares that `workers` grain processes build for one batch."""

  def __init__(self, parent: grain.IterDataset, workers: int):
    super().__init__(parent)
    self._workers = workers

  def __iter__(self) -> _MergedPartsIterator:
    with _main_hidden():
      return _MergedPartsIterator(self._parent.__iter__(), self._workers)


class _MergedPartsIterator(grain.DatasetIterator):
  """grain interleaves its workers' outputs in turn; worker w built rows w, w + W, ... of each batch.

  Workers start on the first fetch, and again after `set_state`: the main script is hidden then.
  """

  def __init__(self, parent: grain.DatasetIterator, workers: int):
    super().__init__(parent)
    self._workers = workers
    self._starting = True

  def __next__(self) -> dict[str, np.ndarray]:
    with _main_hidden() if self._starting else contextlib.nullcontext():
      parts = [next(self._parent) for _ in range(self._workers)]
    self._starting = False
    merged = {}
    for key, first in parts[0].items():
      merged[key] = np.empty((sum(len(p[key]) for p in parts),) + first.shape[1:], first.dtype)
      for w, part in enumerate(parts):
        merged[key][w::self._workers] = part[key]
    return merged

  def get_state(self) -> dict[str, Any]:
    """The union of the workers' row states (grain keeps each as of the last part taken from it).

    Parts are taken a whole batch at a time, so every worker's state is at the same batch.
    """
    with _main_hidden() if self._starting else contextlib.nullcontext():
      grain_state = self._parent.get_state()
    streams = {}
    for worker_state in grain_state["iterators_in_use_states"]:
      streams.update(worker_state["streams"])
    return {"streams": streams}

  def set_state(self, state: dict[str, Any]) -> None:
    """Hands every worker the whole row table; each takes its own rows from it."""
    with _main_hidden():
      grain_state = self._parent.get_state()
      grain_state["iterators_in_use_states"] = [state] * len(grain_state["iterators_in_use_states"])
      self._parent.set_state(grain_state)
    self._starting = True


def _close(open_iterators: list[grain.DatasetIterator]) -> None:
  while open_iterators:
    open_iterators.pop().close()


# What each field of a saved iterator state is called where a user sets it.
_HEADER_NAMES = {"data": "data.source", "split": "split", "seq_len": "data.seq_len", "batch_size": "train.batch_size",
                 "seed": "train.seed", "vocab_size": "the tokenizer's vocabulary size",
                 "pieces": "a dataset of this many pieces (data.chunk_chars or the files changed)",
                 "format": "data.format", "template": "data.template"}


def _allgather_json(value: Any) -> list[Any]:
  """Every process's `value`, in process order (JSON bytes through two allgathers)."""
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(len(data)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  everyone = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:size])) for row, size in zip(everyone, sizes)]


class BatchIterator:
  """Endless batches of one split, prefetched; `get_state()` after k batches, given to
  `set_state()` of a fresh iterator, makes it continue with batch k + 1 exactly.

  The state is JSON-serialisable and describes the batches returned so far, not the ones
  prefetched. It holds every row of the global batch, keyed by row, whichever process built
  it: a run resumes on another number of processes, devices or workers and sees the same rows.
  """

  def __init__(self, dataset: grain.IterDataset, header: dict[str, Any], rows: Sequence[int], truncated: int = 0):
    self._header, self._rows = header, tuple(rows)
    self.truncated = truncated  # instruction examples of this split cut to fit data.seq_len (examples.fit)
    self._open = [dataset.__iter__()]  # emptied by close()
    # Closes (and frees) the grain iterator at exit at the latest, while the modules its cleanup
    # needs are still loaded: grain's own __del__ fails during interpreter shutdown.
    self._finalizer = weakref.finalize(self, _close, self._open)

  @property
  def _iterator(self) -> grain.DatasetIterator:
    if not self._open:
      raise DataError("this batch iterator is closed; make a new one with make_batches()")
    return self._open[0]

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """The position of every row of the global batch, gathered from all processes.

    With several processes this is a collective: every process must call it at the same batch.
    """
    streams = self._iterator.get_state()["streams"]
    if jax.process_count() > 1:
      streams = {row: position for part in _allgather_json(streams) for row, position in part.items()}
    return {**self._header, "iterator": {"streams": streams}}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues where `state` left off; this process takes its own rows' positions from it."""
    for key, value in self._header.items():  # the settings a user changes first come first
      if state.get(key) != value:
        raise DataError(f"this run has {_HEADER_NAMES[key]}={value!r} but its checkpoint was saved with "
                        f"{state.get(key)!r}; resume with the saved value or start another --workdir")
    self._iterator.set_state(state["iterator"])

  @property
  def rows(self) -> list[int]:
    """The global batch rows this process builds."""
    return list(self._rows)

  def close(self) -> None:
    """Stops the prefetch thread and any worker processes."""
    self._finalizer()

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _local_rows(batch_size: int, mesh: Mesh | None) -> list[int]:
  """The global row indices this process builds: those its devices hold (or its equal share)."""
  if mesh is None:
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
      raise DataError(f"batch size {batch_size} is not divisible by the {count} processes; use a multiple of {count}")
    share = batch_size // count
    return list(range(index * share, (index + 1) * share))
  missing = [axis for axis in _BATCH_AXES if axis not in mesh.shape]
  if missing:
    raise DataError(f"the mesh has axes {tuple(mesh.shape)}; batches need axes named {_BATCH_AXES}")
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise DataError(f"batch size {batch_size} is not divisible by mesh data x fsdp = {shards}; use a multiple of {shards}")
  held = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1)).values()
  return sorted({row for index in held for row in range(*index[0].indices(batch_size))})


def _to_global(sharding: NamedSharding, batch_size: int, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return {key: jax.make_array_from_process_local_data(sharding, rows, (batch_size,) + rows.shape[1:])
          for key, rows in batch.items()}


def count_tokens(docs: Documents, tokenizer: Tokenizer, limit: int) -> int:
  """Tokens (eos included) in `docs`, counted in order until `limit` is reached."""
  total = 0
  for start in range(0, len(docs), _COUNT_CHUNK):
    pieces = [docs[i] for i in range(start, min(start + _COUNT_CHUNK, len(docs)))]
    total += sum(map(len, tokenizer.encode_batch([text for text, _ in pieces]))) + sum(ends for _, ends in pieces)
    if total >= limit:
      break
  return total


def _check_size(docs: Documents, tokenizer: Tokenizer, batch_tokens: int, split: str) -> None:
  found = count_tokens(docs, tokenizer, batch_tokens)
  if found >= batch_tokens:
    return
  message = f"{docs.name} holds {found} tokens, fewer than one batch of {batch_tokens} (batch size x data.seq_len)"
  if split == "train":
    raise DataError(f"{message}; lower train.batch_size or data.seq_len, or add data")
  log.warning("%s; each evaluation batch repeats it", message)


def _fit_examples(docs: Documents, template: templates.Template, tokenizer: Tokenizer, seq_len: int,
                  batch_tokens: int, split: str) -> int:
  """Renders and tokenizes every example once, so a bad record or template fails before the first
  batch; checks the split holds a batch of tokens, logs how many examples were cut (once per
  process and setup) and returns that count."""
  cuts = collections.Counter()
  total = 0
  for start in range(0, len(docs), _COUNT_CHUNK):
    chunk = [docs[i] for i in range(start, min(start + _COUNT_CHUNK, len(docs)))]
    for tokens in examples.encode(chunk, template, tokenizer, seq_len):
      cuts[tokens.cut] += 1
      total += len(tokens)
  if total < batch_tokens:
    message = f"{docs.name} holds {total} tokens, fewer than one batch of {batch_tokens} (batch size x data.seq_len)"
    if split == "train":
      raise DataError(f"{message}; lower train.batch_size or data.seq_len, or add data")
    log.warning("%s; each evaluation batch repeats it", message)
  cut = cuts["prompt"] + cuts["response"]
  key = (split, docs.name, seq_len, template)
  if cut and key not in _reported_cuts:
    _reported_cuts.add(key)
    log.warning("%s: %d of %d examples are longer than data.seq_len=%d tokens: %d lost the start of their prompt, "
                "%d (a response longer than seq_len) kept the prompt's end and the response's start; raise "
                "data.seq_len to keep more whole", docs.name, cut, len(docs), seq_len, cuts["prompt"], cuts["response"])
  return cut


def _fit_sentences(docs: Documents, tokenizer: Tokenizer, seq_len: int, batch_tokens: int, split: str) -> int:
  """Tokenizes every classification example once: checks the split holds a batch of tokens, logs how
  many were cut (once per process and setup) and returns that count."""
  encoded = [example for start in range(0, len(docs), _COUNT_CHUNK)
             for example in encode_sentences([docs[i] for i in range(start, min(start + _COUNT_CHUNK, len(docs)))],
                                             tokenizer, seq_len)]
  total, cut = sum(map(len, encoded)), sum(example.cut for example in encoded)
  if total < batch_tokens and split == "train":
    raise DataError(f"{docs.name} holds {total} tokens, fewer than one batch of {batch_tokens} (batch size x "
                    "data.seq_len); lower train.batch_size or data.seq_len, or add data")
  key = (split, docs.name, seq_len, "classification")
  if cut and key not in _reported_cuts:
    _reported_cuts.add(key)
    log.warning("%s: %d of %d examples are longer than data.seq_len=%d tokens and lost their start; raise "
                "data.seq_len to keep them whole", docs.name, cut, len(docs), seq_len)
  return cut


def one_pass(data: DataConfig, tokenizer: Tokenizer, *, batch_size: int, mesh: Mesh | None, split: str = "test",
             num_classes: int = 0) -> Iterator[Batch]:
  """Every classification example of `split` exactly once, then stop: slot r packs examples r, r + B, ...
  as `make_batches` does; batches go on until the longest slot is done (emptied slots are padding).

  Every process tokenizes the whole split (a test set is small), so all of them agree on the number
  of batches, and each builds only its own rows.
  """
  if data.format != "classification":
    raise DataError(f"one_pass reads classification examples; data.format is {data.format!r}")
  rows = _local_rows(batch_size, mesh)
  docs = sources.load(data, split, num_classes)
  encoded = encode_sentences([docs[i] for i in range(len(docs))], tokenizer, data.seq_len)
  slots = {r: collections.deque(encoded[r::batch_size]) for r in range(batch_size)}
  pad = pad_id(tokenizer)
  to_global = functools.partial(_to_global, sharding.batch_sharding(mesh), batch_size) if mesh is not None else None
  while any(slots.values()):
    inputs_RL = np.full((batch_size, data.seq_len), pad, np.int32)
    segments_RL = np.zeros_like(inputs_RL)
    labels_RL = np.full_like(inputs_RL, -1)
    for r, pending in slots.items():
      _fill_row(pending, inputs_RL[r], segments_RL[r], labels_RL[r])
    fields = {k: v[rows] for k, v in classification_fields(inputs_RL, segments_RL, labels_RL).items()}
    yield to_global(fields) if to_global else fields


def make_batches(data: DataConfig, tokenizer: Tokenizer, *, batch_size: int, seed: int,
                 mesh: Mesh | None, split: str = "train", num_classes: int = 0) -> BatchIterator:
  """Endless packed batches of `split` ("train": shuffled by `seed`, a new order each epoch;
  "eval": the validation data in order, cycled, the same batches from every fresh call).
  `num_classes` > 0 bounds the labels of classification examples.

  `batch_size` is global. With a mesh, every array is a global `jax.Array` sharded
  P(("data", "fsdp"), None) and this process builds only the rows its devices hold; with
  mesh=None, the arrays are numpy, this process's equal share of the rows.
  """
  if data.seq_len <= 0 or batch_size <= 0:
    raise DataError(f"batch size {batch_size} and data.seq_len={data.seq_len} must be positive")
  if data.prefetch < 0 or data.worker_count < 0:
    raise DataError(f"data.prefetch={data.prefetch} and data.worker_count={data.worker_count} must be 0 or more")
  if split not in ("train", "eval"):  # a test split is read once, whole: one_pass
    raise DataError(f"split {split!r}: expected train or eval")
  rows = _local_rows(batch_size, mesh)
  docs = sources.load(data, split, num_classes)
  try:
    template = "classification" if data.format == "classification" else templates.from_config(data, tokenizer)
  except templates.TemplateError as e:
    raise DataError(str(e)) from None
  truncated = 0
  if template == "classification":
    truncated = _fit_sentences(docs, tokenizer, data.seq_len, batch_size * data.seq_len, split)
  elif template is None:
    _check_size(docs, tokenizer, batch_size * data.seq_len, split)
  else:
    truncated = _fit_examples(docs, template, tokenizer, data.seq_len, batch_size * data.seq_len, split)
  ordered = grain.MapDataset.source(docs)
  ordered = ordered.shuffle(seed=seed % 2**32).repeat() if split == "train" else ordered.repeat()
  dataset = _PackedRows(ordered, tokenizer, rows, batch_size, data.seq_len, template)
  workers = min(data.worker_count, len(rows))
  if workers:
    _parse_absl_flags()
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, data.prefetch))
    dataset = _MergedParts(dataset.mp_prefetch(options), workers)
  if mesh is not None:
    dataset = dataset.map(functools.partial(_to_global, sharding.batch_sharding(mesh), batch_size))
  dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=data.prefetch)
  header = {"data": docs.name, "split": split, "seq_len": data.seq_len, "batch_size": batch_size,
            "seed": seed if split == "train" else None, "vocab_size": tokenizer.vocab_size, "pieces": len(docs)}
  if template is not None:  # text runs keep the header (and so the checkpoints) they always had
    header.update(format=data.format, template=getattr(template, "name", template))
  return BatchIterator(dataset, header, rows, truncated)
