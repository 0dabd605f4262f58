"""Packed, sharded, resumable batches: documents -> tokens -> rows of seq_len -> global arrays.

Each batch is a dict of [B, L] arrays (B the global batch size, L = data.seq_len):

  inputs       int32    token ids
  targets      int32    the next token in the same row (0 after the last position)
  segment_ids  int32    1, 2, ... for each piece of text (or example) in the row; 0 is padding
  positions    int32    0, 1, ... restarting at the start of every segment
  loss_mask    float32  1 where the target is the next token of the same segment: 0 at the row's end and at
                        every boundary, so no row ever trains one document to predict another; for
                        instruction examples, 1 only where that target is a trained (response) token

Why a stream per slot: rows depend only on (data, seed, B, L), never on how many processes,
devices or workers build them. Each process builds just the slots its devices hold (from the
mesh's sharding), so it reads only its share of the data, and the global array is the same as
one process would build; grain workers split a process's slots the same way. The iterator state
is two integers per slot (the piece index and the tokens of it already used), so `set_state`
resumes exactly, without replaying the past.

The rows themselves (packing, instruction examples, classification) are made in `packing.py`;
a `data.mixture` deals each slot's rows among several sources' streams (`mixture.py`).
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
from llm_jax.data import examples, mixture, packing, shards, sources, templates
from llm_jax.data.documents import DataError, Documents
from llm_jax.data.tokenizer import Tokenizer

Batch = dict[str, Any]  # numpy arrays on the host (mesh=None) or global jax.Arrays
_BATCH_AXES = sharding.RULES["batch"]  # the mesh axes the rows are split over
_COUNT_CHUNK = 256  # pieces tokenized per call while counting a split's tokens

log = logging.getLogger(__name__)
_reported_cuts: set[tuple] = set()  # (split, data, seq_len, template) whose truncation count this process logged




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
    # The settings a user sets come before "pieces", which follows from them (data.seq_len sets the
    # default data.chunk_chars): the message names the cause, not its consequence.
    for key in sorted(self._header, key=lambda key: key == "pieces"):
      value = self._header[key]
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
  total, pretokenized = 0, sources.token_shards(docs) is not None
  for start in range(0, len(docs), _COUNT_CHUNK):
    pieces = [docs[i] for i in range(start, min(start + _COUNT_CHUNK, len(docs)))]
    if pretokenized:
      total += sum(map(len, pieces))
    else:
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
             for example in packing.encode_sentences([docs[i] for i in range(start, min(start + _COUNT_CHUNK, len(docs)))],
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
  encoded = packing.encode_sentences([docs[i] for i in range(len(docs))], tokenizer, data.seq_len)
  slots = {r: collections.deque(encoded[r::batch_size]) for r in range(batch_size)}
  pad = packing.pad_id(tokenizer)
  to_global = functools.partial(_to_global, sharding.batch_sharding(mesh), batch_size) if mesh is not None else None
  while any(slots.values()):
    inputs_RL = np.full((batch_size, data.seq_len), pad, np.int32)
    segments_RL = np.zeros_like(inputs_RL)
    labels_RL = np.full_like(inputs_RL, -1)
    for r, pending in slots.items():
      packing.fill_row(pending, inputs_RL[r], segments_RL[r], labels_RL[r])
    fields = {k: v[rows] for k, v in packing.classification_fields(inputs_RL, segments_RL, labels_RL).items()}
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
  if data.mixture and not (split == "eval" and data.eval_source):
    dataset, header, truncated = _mixed_rows(data, tokenizer, rows, batch_size, seed, split)
  else:
    dataset, header, truncated = _source_rows(data, tokenizer, rows, batch_size, seed, split, num_classes)
  workers = min(data.worker_count, len(rows))
  if workers:
    _parse_absl_flags()
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, data.prefetch))
    dataset = _MergedParts(dataset.mp_prefetch(options), workers)
  if mesh is not None:
    dataset = dataset.map(functools.partial(_to_global, sharding.batch_sharding(mesh), batch_size))
  dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=data.prefetch)
  header.update(split=split, seq_len=data.seq_len, batch_size=batch_size, seed=seed if split == "train" else None,
                vocab_size=tokenizer.vocab_size)
  return BatchIterator(dataset, header, rows, truncated)


def _source_rows(data: DataConfig, tokenizer: Tokenizer, rows: list[int], batch_size: int, seed: int, split: str,
                 num_classes: int) -> tuple[packing.PackedRows, dict[str, Any], int]:
  """The rows of data.source's `split`, the resume header's source fields, and the examples cut to fit."""
  docs = sources.load(data, split, num_classes)
  try:
    template = "classification" if data.format == "classification" else templates.from_config(data, tokenizer)
  except templates.TemplateError as e:
    raise DataError(str(e)) from None
  truncated = 0
  if (token_source := sources.token_shards(docs)) is not None:
    token_source.check_tokenizer(tokenizer)
    template = "tokens"
  if template in (None, "tokens"):
    _check_size(docs, tokenizer, batch_size * data.seq_len, split)
  elif template == "classification":
    truncated = _fit_sentences(docs, tokenizer, data.seq_len, batch_size * data.seq_len, split)
  else:
    truncated = _fit_examples(docs, template, tokenizer, data.seq_len, batch_size * data.seq_len, split)
  ordered = grain.MapDataset.source(docs)
  ordered = ordered.shuffle(seed=seed % 2**32).repeat() if split == "train" else ordered.repeat()
  header = {"data": docs.name, "pieces": len(docs)}
  if template not in (None, "tokens"):  # text runs keep the header (and so the checkpoints) they always had
    header.update(format=data.format, template=getattr(template, "name", template))
  return packing.PackedRows(ordered, tokenizer, rows, batch_size, data.seq_len, template), header, truncated


def _mixed_rows(data: DataConfig, tokenizer: Tokenizer, rows: list[int], batch_size: int, seed: int,
                split: str) -> tuple[mixture.MixedRows, dict[str, Any], int]:
  """Rows of data.mixture: each source's own `split` (its held-out share or validation split), packed
  alone, and interleaved by weight (`mixture.py`)."""
  if data.format != "text":
    raise DataError(f"data.mixture mixes documents (data.format=text), not {data.format} records; train on one "
                    "source or merge the record files")
  _check_same_tokenizer(data.mixture)
  parts, names, pieces = [], [], []
  for i, (source, _) in enumerate(data.mixture):
    one = dataclasses.replace(data, source=source, mixture=())
    part, header, _ = _source_rows(one, tokenizer, rows, batch_size, seed + i, split, 0)
    parts.append(part)
    names.append(header["data"])
    pieces.append(header["pieces"])
  weights = [weight for _, weight in data.mixture]
  header = {"data": [[name, weight] for name, weight in zip(names, weights)], "pieces": pieces}
  return mixture.MixedRows(parts, weights, seed if split == "train" else 0, rows), header, 0


def _check_same_tokenizer(pairs: Sequence[tuple[str, float]]) -> None:
  """Refuses, in one line, a mixture of token shards written by different tokenizers."""
  made = {}
  for source, _ in pairs:
    if source.startswith("tokens:"):
      made.setdefault(shards.read_manifest(source.partition(":")[2])["tokenizer"]["fingerprint"], source)
  if len(made) > 1:
    first, second = list(made.values())[:2]
    raise DataError(f"data.mixture mixes {first} and {second}, which were tokenized with different tokenizers; "
                    "tokenize every source with the one data.tokenizer of the run")
