"""Weighted mixtures of sources (`data.mixture=[(SOURCE, WEIGHT), ...]`): each row from one source.

Row slot r keeps a row stream per source (the streams of `packing.py`, over that source's own
shuffled pieces) and a count k of rows it has made. Its row k comes from the source that a
schedule fixes for (seed, r, k): rows are dealt in blocks of 100, and block b holds each source
in proportion to its weight (cumulative rounding, so source s has round(W_s x n) rows of the
first n = 100 b, within one), in an order shuffled by (seed, r, b). So the proportions hold to
within one row per slot and block, whatever the number of batches, and a row's source depends on
(seed, r, k) only: never on processes, devices or workers, as for a single source.

The state of slot r is [k, then piece and offset for every source]: a resumed run continues every
source exactly where it was.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Sequence

import grain
import numpy as np

from llm_jax.config import Mixture
from llm_jax.data import packing
from llm_jax.data.documents import DataError

BLOCK = 100  # rows of a slot dealt per shuffled block


class Schedule:
  """Which source gives row k of slot r (see the module docstring)."""

  def __init__(self, weights: Sequence[float], seed: int):
    self._cumulative = np.cumsum(np.asarray(weights, np.float64) / sum(weights))
    self._cumulative[-1] = 1.0
    self._seed = seed
    self._blocks: dict[int, tuple[int, np.ndarray]] = {}  # slot -> (block, its sources), the last one dealt

  def counts(self, block: int) -> np.ndarray:
    """Rows of each source in `block`: the cumulative-rounded share of the rows up to its end, less those before."""
    def dealt(n: int) -> np.ndarray:
      return np.diff(np.floor(self._cumulative * n + 0.5).astype(np.int64), prepend=0)
    return dealt((block + 1) * BLOCK) - dealt(block * BLOCK)

  def source(self, row: int, k: int) -> int:
    block = k // BLOCK
    if self._blocks.get(row, (-1,))[0] != block:
      order = np.repeat(np.arange(len(self._cumulative)), self.counts(block))
      self._blocks[row] = (block, np.random.default_rng([self._seed, row, block]).permutation(order))
    return int(self._blocks[row][1][k % BLOCK])


def labels(mixture: Mixture) -> list[str]:
  """Short, distinct names of the sources for metrics: the last plain part of each path (web, code, ...)."""
  names = []
  for source, _ in mixture:
    parts = [p for p in re.split(r"[:/]", source.partition(":")[2]) if p and not re.search(r"[*?\[\]]", p)]
    name = re.sub(r"[^\w.-]", "_", pathlib.PurePath(parts[-1]).stem if parts else source.partition(":")[0])
    names.append(name)
  return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]


class _MixedRowsIterator(grain.DatasetIterator):
  """Rows of several sources' slot streams, one source per row, as `Schedule` deals them."""

  def __init__(self, parts: list[packing.RowsIterator], schedule: Schedule, rows: Sequence[int]):
    super().__init__()
    self._parts, self._schedule, self._rows = parts, schedule, list(rows)
    self._made = [0] * len(self._rows)  # rows each slot has made

  def __next__(self) -> dict[str, np.ndarray]:
    choice = [self._schedule.source(row, k) for row, k in zip(self._rows, self._made)]
    fields = None
    for s, part in enumerate(self._parts):
      mine = [i for i, c in enumerate(choice) if c == s]
      if not mine:
        continue
      arrays = part.rows_of([part.streams[i] for i in mine])
      if fields is None:
        fields = [np.empty((len(self._rows),) + a.shape[1:], a.dtype) for a in arrays]
      for field, array in zip(fields, arrays):
        field[mine] = array
    self._made = [k + 1 for k in self._made]
    return packing.batch_fields(*fields)

  def get_state(self) -> dict[str, Any]:
    """{"streams": {row: [rows made, piece and offset of source 0, of source 1, ...]}}."""
    states = [part.get_state()["streams"] for part in self._parts]
    return {"streams": {str(row): [k] + [x for state in states for x in state[str(row)]]
                        for row, k in zip(self._rows, self._made)}}

  def set_state(self, state: dict[str, Any]) -> None:
    streams = state["streams"]
    missing = [row for row in self._rows if str(row) not in streams]
    if missing:
      raise DataError(f"data iterator state has no position for row {missing[0]} of the batch; it was saved by "
                      "another train.batch_size: resume with the saved one")
    self._made = [int(streams[str(row)][0]) for row in self._rows]
    for s, part in enumerate(self._parts):
      part.set_state({"streams": {str(row): streams[str(row)][1 + 2 * s:3 + 2 * s] for row in self._rows}})


class MixedRows(grain.IterDataset):
  """The rows of slots `rows` from several `packing.PackedRows` (one per source, over the same slots)."""

  def __init__(self, parts: list[packing.PackedRows], weights: Sequence[float], seed: int, rows: Sequence[int]):
    super().__init__(parts)
    self._parts, self._weights, self._seed, self._rows = parts, tuple(weights), seed, tuple(rows)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    self._rows = self._rows[sl]
    for part in self._parts:
      part.set_slice(sl, sequential_slice)

  def __iter__(self) -> _MixedRowsIterator:
    return _MixedRowsIterator([part.__iter__() for part in self._parts], Schedule(self._weights, self._seed),
                              self._rows)
