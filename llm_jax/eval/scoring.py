"""The one log-likelihood engine under every task: many (context, continuation) requests at once.

`score` cuts each request to the model's context (lm-eval's left truncation: the last max_len
tokens of context + continuation, minus the last, are the input), packs the short ones several
to a row of `pack_len` tokens (segment ids keep them apart, positions restart in each, as in
training), opens for each longer one a row of its length bucket, whose rest short ones fill too,
and runs batches of about `batch_size` x `pack_len` tokens, a shape's last batch cut to the power
of two of rows that holds what is left. Most requests of a task share one shape, so an
evaluation compiles a handful of times, not once per length, and little of a row is padding. With a mesh the batch is split over its batch axes (data, fsdp) and
the parameters are replicated onto it unless they already live there. Every batch is dispatched
before any result is fetched; results come back in request order.

`classify` runs a classifier's head over examples the same way, one example a row. `rolling` is
lm-eval's `loglikelihood_rolling`: a document is cut into windows of the model's context that
together predict every token exactly once, each window a request of `score`.

Padding sits to the right of each row: attention is causal by position, so a real token never
sees it. Requests are ordered by their tokens, not by where they came in, so the same set of
requests always meets in the same rows and batches and gives the same figures bit for bit.
Dimension letters as in model/transformer.py.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sharding
from llm_jax.config import ModelConfig
from llm_jax.errors import UserError
from llm_jax.model import heads, transformer

MIN_BUCKET = 16
Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


class ScoringError(UserError):
  """A request the model cannot score as given."""


def token_log_probs(params: Any, cfg: ModelConfig, inputs_BL: jax.Array, targets_BL: jax.Array, *,
                    segment_ids_BL: jax.Array | None = None,
                    positions_BL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(log p(target) in float32 [B, L], whether the target is the argmax [B, L]) at every position.

  log p is the target's logit minus the logsumexp of the row, the two terms the training loss
  (`train/losses.lm_loss`) subtracts the other way round, so an eval loss built on this is the
  training loss's own figure.
  """
  logits_BLV = transformer.forward(params, cfg, inputs_BL, segment_ids_BL=segment_ids_BL, positions_BL=positions_BL)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  log_p_BL = target_logit_BL - jax.nn.logsumexp(logits_BLV, axis=-1)
  return log_p_BL, jnp.argmax(logits_BLV, axis=-1) == targets_BL


@functools.partial(jax.jit, static_argnames="cfg")
def _score_tokens(params: Any, inputs_BL: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array,
                  segment_ids_BL: jax.Array, positions_BL: jax.Array, *,
                  cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Per token: log p of a continuation target (0 elsewhere) [B, L], and whether it is greedy (True elsewhere) [B, L].

  Per token rather than per row, because a packed row holds several requests: the host sums each one's span.
  """
  log_p_BL, greedy_BL = token_log_probs(params, cfg, inputs_BL, targets_BL, segment_ids_BL=segment_ids_BL,
                                        positions_BL=positions_BL)
  scored_BL = mask_BL > 0
  return jnp.where(scored_BL, log_p_BL, 0.0), greedy_BL | ~scored_BL


def buckets(max_len: int) -> list[int]:
  """The padded lengths rows are compiled at: 16, 24, 32, 48, 64, 96, ... below max_len, then max_len.

  Steps of 2 and 1.5 keep the padding under a third of a row while the number of compiled
  shapes grows only with log(max_len).
  """
  out, size = [], MIN_BUCKET
  while size < max_len:
    out += [b for b in (size, size * 3 // 2) if b < max_len]
    size *= 2
  return out + [max_len]


def needs_truncation(request: Request, max_len: int) -> bool:
  """Whether a request is longer than the model's context, so `score` keeps only its last tokens."""
  return len(request[0]) + len(request[1]) > max_len + 1


def _row(context: Sequence[int], continuation: Sequence[int], max_len: int, index: int,
         truncate: bool) -> tuple[list[int], int]:
  """(the last max_len + 1 tokens of context + continuation, how many of them are the continuation)."""
  if not len(context):
    raise ScoringError(f"request {index} has an empty context; condition on a prefix token (bos or eos) at least")
  if not len(continuation):
    raise ScoringError(f"request {index} has an empty continuation; give at least one token to score")
  if len(continuation) > max_len:
    raise ScoringError(f"request {index}: its continuation of {len(continuation)} tokens does not fit the model's "
                       f"context of model.max_len={max_len} tokens; score a shorter continuation, or split it with "
                       "rolling log-likelihood")
  if not truncate and needs_truncation((context, continuation), max_len):
    raise ScoringError(f"request {index}: its context of {len(context)} tokens and continuation of "
                       f"{len(continuation)} are longer than the model's context of model.max_len={max_len} + 1 "
                       f"tokens; shorten the context to at most {max_len + 1 - len(continuation)} tokens, or pass "
                       "truncate=True to keep its last tokens as lm-eval does")
  tokens = [int(t) for t in itertools.chain(context, continuation)][-(max_len + 1):]
  return tokens, len(continuation)


def _place(params: Any, mesh: jax.sharding.Mesh) -> Any:
  """Parameters on `mesh`: kept where they already live on it, replicated onto it otherwise."""
  replicated = sharding.replicated(mesh)
  def one(x):
    on_mesh = isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) and x.sharding.mesh == mesh
    return x if on_mesh else jax.device_put(x, replicated)
  return jax.tree.map(one, params)


def batch_shards(mesh: jax.sharding.Mesh | None) -> int:
  """How many ways the batch dimension is split: every batch size is rounded up to a multiple of it."""
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))


# Tokens a packed row holds. A row of 512 takes about three byte-level PIQA requests (median 127
# tokens) or ten subword ones, so nine in ten requests of such tasks share one compiled shape; on
# the bench model 512 scored all of PIQA within 6% of 256 once compiled, and compiled fewer shapes
# (docs/evaluation.md). Attention's cost per token grows with the row, little at these lengths.
PACK_LEN = 512


def score(params: Any, model_cfg: ModelConfig, requests: Sequence[Request], *, batch_size: int = 32,
          mesh: jax.sharding.Mesh | None = None, truncate: bool = True,
          pack_len: int = PACK_LEN) -> list[tuple[float, bool]]:
  """(log p(continuation | context), whether greedy decoding produces the continuation) of each request.

  Ids are sequences of ints; the context may not be empty (condition on a prefix token instead)
  and the continuation must fit in model.max_len tokens (else a ScoringError). A longer request
  keeps its last max_len + 1 tokens, as lm-eval does, or with `truncate=False` is refused.
  Requests of at most `pack_len` (capped at model.max_len) input tokens share rows of that length;
  `pack_len=0` gives every request a row of its own. A batch holds `batch_size` rows of up to
  `pack_len` tokens, or as many longer rows as fit in as many tokens (at least one; `batch_size` of
  them without packing), rounded up to a multiple of the mesh's batch shards; the figures do not
  depend on either setting beyond float rounding.
  """
  rows = [_row(c, x, model_cfg.max_len, i, truncate) for i, (c, x) in enumerate(requests)]
  pack_len = min(pack_len, model_cfg.max_len)
  groups = _pack_requests(rows, pack_len, buckets(model_cfg.max_len))
  outputs = _batched(params, model_cfg, [[rows[i] for i in g] for g, _ in groups], [n for _, n in groups], _pack,
                     _score_tokens, batch_size=batch_size, mesh=mesh, batch_tokens=batch_size * pack_len)
  results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
  for (group, _), (log_p_L, greedy_L) in zip(groups, outputs):
    start = 0
    for i in group:
      stop = start + len(rows[i][0]) - 1
      results[i] = (float(log_p_L[start:stop].sum()), bool(greedy_L[start:stop].all()))
      start = stop
  return results


def _pack_requests(rows: list[tuple[list[int], int]], pack_len: int, sizes: list[int]) -> list[tuple[list[int], int]]:
  """(request indices, row length) of each row, best fit, longest first (then by tokens, so the rows do
  not depend on the requests' order): a request of more than `pack_len` input tokens opens a row of its
  length bucket (`sizes`), any other a row of `pack_len`, and shorter requests fill what rows leave."""
  lengths = [len(tokens) - 1 for tokens, _ in rows]
  groups: list[tuple[list[int], int]] = []
  free: list[tuple[int, int]] = []  # (tokens left, group) of the rows that can take another request, sorted
  for i in sorted(range(len(rows)), key=lambda i: (-lengths[i], rows[i])):
    fit = bisect.bisect_left(free, (lengths[i], -1)) if lengths[i] <= pack_len else len(free)
    if fit < len(free):
      left, g = free.pop(fit)
      groups[g][0].append(i)
    else:
      left = pack_len if lengths[i] <= pack_len else sizes[bisect.bisect_left(sizes, lengths[i])]
      g = len(groups)
      groups.append(([i], left))
    if pack_len:
      bisect.insort(free, (left - lengths[i], g))
  return groups


def _pack(groups: list[list[tuple[list[int], int]]], batch_size: int, length: int) -> tuple[np.ndarray, ...]:
  """inputs, targets, continuation mask, segment ids and positions [batch_size, length], right-padded with 0.

  Each group is one row: its requests one after another, segment ids 1, 2, ... and positions from 0 in each.
  """
  inputs_BL = np.zeros((batch_size, length), np.int32)
  targets_BL = np.zeros((batch_size, length), np.int32)
  mask_BL = np.zeros((batch_size, length), np.float32)
  segment_ids_BL = np.zeros((batch_size, length), np.int32)
  positions_BL = np.zeros((batch_size, length), np.int32)
  for b, group in enumerate(groups):
    start = 0
    for segment, (tokens, n) in enumerate(group, start=1):
      stop = start + len(tokens) - 1
      inputs_BL[b, start:stop], targets_BL[b, start:stop] = tokens[:-1], tokens[1:]
      mask_BL[b, stop - n:stop] = 1.0
      segment_ids_BL[b, start:stop], positions_BL[b, start:stop] = segment, np.arange(stop - start)
      start = stop
  return inputs_BL, targets_BL, mask_BL, segment_ids_BL, positions_BL


@functools.partial(jax.jit, static_argnames="cfg")
def _classify_rows(params: Any, inputs_BL: jax.Array, last_B: jax.Array, *, cfg: ModelConfig) -> jax.Array:
  """Class logits [B, C] read at each row's last real token."""
  hidden_BLD = transformer.hidden(params, cfg, inputs_BL)
  h_B1D = jnp.take_along_axis(hidden_BLD, last_B[:, None, None], axis=1)
  return heads.classify(params, cfg, h_B1D)[:, 0]


def _pack_examples(rows: list[list[int]], batch_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """inputs (int32) [batch_size, length] right-padded with 0, and each row's last index [batch_size]."""
  inputs_BL = np.zeros((batch_size, length), np.int32)
  last_B = np.zeros((batch_size,), np.int32)
  for b, tokens in enumerate(rows):
    inputs_BL[b, :len(tokens)], last_B[b] = tokens, len(tokens) - 1
  return inputs_BL, last_B


def classify(params: Any, model_cfg: ModelConfig, examples: Sequence[Sequence[int]], *, batch_size: int = 32,
             mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """Class logits [N, C] (float32) of a classifier (model.num_classes > 0) for each example's token ids.

  The head reads the last token, as in training, where each example ends with eos; an example
  longer than model.max_len keeps its last tokens, as the trainer's rows do. Batched and
  bucketed like `score`.
  """
  rows = [[int(t) for t in ids][-model_cfg.max_len:] for ids in examples]
  if any(not row for row in rows):
    raise ScoringError("an example without tokens cannot be classified; end each with the eos token, as training did")
  outputs = _batched(params, model_cfg, rows, [len(r) for r in rows], _pack_examples, _classify_rows,
                     batch_size=batch_size, mesh=mesh)
  return np.stack([logits for (logits,) in outputs]) if outputs else np.zeros((0, model_cfg.num_classes), np.float32)


def _batched(params: Any, model_cfg: ModelConfig, rows: list, lengths: list[int], pack: Callable,
             compute: Callable, *, batch_size: int, mesh: jax.sharding.Mesh | None,
             batch_tokens: int = 0) -> list[tuple[np.ndarray, ...]]:
  """`compute(params, *pack(batch rows, rows in the batch, bucket length), cfg=model_cfg)` over every row,
  each output's row j belonging to the batch's row j; returns each row's outputs in the order of `rows`.

  Rows go longest first (memory runs out at once if at all), then by content, so a batch never
  depends on the order the rows came in; each is padded to its length bucket. A batch holds
  `batch_size` rows, or with `batch_tokens` only as many as fit in that many tokens (at least one),
  so long rows do not multiply a batch's memory and time; a bucket's last batch is cut to the
  power of two that holds its rows, so two long requests do not pay for a full batch.
  """
  if batch_size < 1:
    raise ScoringError(f"batch_size={batch_size}: expected at least 1")
  if not rows:
    return []
  shards = batch_shards(mesh)
  sizes = buckets(model_cfg.max_len)
  order = sorted(range(len(rows)), key=lambda i: (-lengths[i], rows[i]))
  put = (lambda x: jax.device_put(x, sharding.batch_sharding(mesh) if x.ndim == 2 else
                                  jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch",))))
         ) if mesh is not None else jnp.asarray
  if mesh is not None:
    params = _place(params, mesh)
  pending = []
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for length, group in itertools.groupby(order, key=lambda i: sizes[np.searchsorted(sizes, lengths[i])]):
      group = list(group)
      per_batch = max(1, min(batch_size, batch_tokens // length)) if batch_tokens else batch_size
      for start in range(0, len(group), per_batch):
        chunk = group[start:start + per_batch]
        padded = min(per_batch, 1 << (len(chunk) - 1).bit_length())
        arrays = pack([rows[i] for i in chunk], -(-padded // shards) * shards, length)
        pending.append((chunk, compute(params, *map(put, arrays), cfg=model_cfg)))
  results: list[Any] = [None] * len(rows)
  for chunk, outputs in pending:
    outputs = jax.device_get(outputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for j, i in enumerate(chunk):
      results[i] = tuple(out[j] for out in outputs)
  return results


def rolling_windows(token_ids: Sequence[int], max_len: int, overlap: int = 0,
                    prefix_id: int | None = None) -> list[tuple[list[int], list[int]]]:
  """The (context, continuation) requests that predict every token of a document exactly once.

  lm-eval's rolling windows made disjoint (its `get_rolling_token_windows` with context_len =
  overlap + 1, then `make_disjoint_window`): the first window predicts the first max_len tokens
  from `prefix_id`; each next one predicts the next max_len - overlap tokens (fewer in the last)
  with as much context before them as fills the model's max_len: `overlap` tokens of the
  previous window, one more, and the last window as many as fit. Without `prefix_id` the
  document's first token is context only and is not predicted (models trained by llm-jax
  start a document at position 0 with no token before it), so len(token_ids) - 1 are.
  """
  if not 0 <= overlap < max_len:
    raise ScoringError(f"overlap={overlap}: expected 0 <= overlap < model.max_len={max_len}")
  seq = ([prefix_id] if prefix_id is not None else []) + [int(t) for t in token_ids]
  if len(seq) < 2:
    return []
  prefix, rest = seq[0], seq[1:]
  first = min(max_len, len(rest))
  windows = [([prefix], rest[:first])]
  done = first
  while done < len(rest):
    end = done + min(len(rest) - done, max_len - overlap)
    # rest[end - max_len - 1:] starts at or after index 0: a second window exists only once done >= max_len.
    windows.append((rest[end - max_len - 1:done], rest[done:end]))
    done = end
  return windows


def predicted_tokens(token_ids: Sequence[int], prefix_id: int | None) -> int:
  """How many tokens `rolling` predicts in a document: all of them with a prefix, all but the first without."""
  return len(token_ids) if prefix_id is not None else max(len(token_ids) - 1, 0)


def rolling(params: Any, model_cfg: ModelConfig, token_ids_per_doc: Sequence[Sequence[int]], *,
            prefix_id: int | None, batch_size: int = 32, overlap: int = 0,
            mesh: jax.sharding.Mesh | None = None) -> list[float]:
  """Summed log p of every predicted token of each document (see `rolling_windows`), in order.

  All documents' windows go through one `score` call, so they share batches and buckets.
  """
  requests, owners = [], []
  for d, ids in enumerate(token_ids_per_doc):
    windows = rolling_windows(ids, model_cfg.max_len, overlap, prefix_id)
    requests += windows
    owners += [d] * len(windows)
  totals = [0.0] * len(token_ids_per_doc)
  for d, (log_p, _) in zip(owners, score(params, model_cfg, requests, batch_size=batch_size, mesh=mesh)):
    totals[d] += log_p
  return totals
