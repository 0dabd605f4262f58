"""KV cache, prefill and the jitted decode loop.

Prompts are left-padded to a common length so every row writes its next key and value into
the same cache slot at each step: the write is one `dynamic_update_slice` at a scalar index
(in place inside the loop) instead of a per-row scatter, and all rows run in lockstep. Padding
never changes a row's output because the pad slots have segment id 0 (seen by nothing) and
each row's positions start at 0 at its first real token, whatever the padding before it.

Compilation is per length bucket: the prompt length and the cache length are rounded up to
powers of two, and `max_new_tokens`, the seed and the eos id are traced, so a new prompt or a
new budget in the same bucket reuses the compiled loop. Prefill and the whole decode loop run
in one jitted call: no host round trip per token.

Dimension letters as in the model (B, L, S, V, G, K, N layers) plus T generated tokens, M stop
sequences, W the longest stop sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import UserError
from llm_jax.model import layers, transformer
from llm_jax.sampling.strategies import Sampler
from llm_jax.sharding import constrain

Params = dict[str, Any]

# Logical axes of one layer's cached keys or values; scanned caches add "layers" in front.
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")
MIN_BUCKET = 8
FINISH_REASONS = ("length", "eos", "stop")  # what the loops' reason codes 0, 1, 2 mean
_EOS, _STOP = FINISH_REASONS.index("eos"), FINISH_REASONS.index("stop")


class KVCache(NamedTuple):
  """Keys and values of every layer for S slots per row, and which slots hold what.

  `kv` is {"k": [N, B, G, S, K], "v": ...} when the parameters are scanned, else a tuple of N
  {"k": [B, G, S, K], "v": ...}. Heads come before slots because XLA's attention contracts per
  (batch, head): stored [B, S, G, K], every layer would copy its whole cache into that order at
  every step (on CPU attention over 256 slots took 8x longer). Both shard over batch and kv heads.
  Row b's real tokens occupy slots [start_B[b], end); slots before start_B[b] are padding. `end`
  is one scalar when every row moves in lockstep (`generate`: each step writes one slot for all
  rows, in place), or [B] when rows move on their own (the serving engine's slots, speculative
  decoding's accepted runs): then each row writes at its own end, a scatter.
  """

  kv: Any
  start_B: jax.Array
  end: jax.Array


@dataclasses.dataclass(frozen=True)
class Completion:
  """One prompt's generated tokens, up to and including the one that stopped it.

  `log_probs[i]` is the model's log-probability of `tokens[i]` (log_softmax of the raw logits,
  before temperature or filtering), so the values mean the same under every strategy and sum to
  the continuation's log-likelihood. `score` is that sum, or the beam's length-penalized score.
  """

  tokens: list[int]
  log_probs: list[float]
  finish_reason: str  # "eos", "stop" (a stop sequence) or "length" (max_new_tokens)
  score: float


def init_cache(params: Params, cfg: ModelConfig, start_B: jax.Array, length: int) -> KVCache:
  """An empty cache of `length` slots per row, laid out as the parameters are (scanned or not)."""
  scanned = transformer.is_scanned(params)
  shape = (cfg.num_layers,) * scanned + (start_B.shape[0], cfg.num_kv_heads, length, cfg.dim_per_head)
  axes = ("layers",) * scanned + CACHE_AXES

  def zeros():  # a fresh buffer per call: k and v are updated in place and must never alias
    return constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), axes)

  if scanned:
    kv = {"k": zeros(), "v": zeros()}
  else:
    kv = tuple({"k": zeros(), "v": zeros()} for _ in range(cfg.num_layers))
  return KVCache(kv, jnp.asarray(start_B, jnp.int32), jnp.zeros((), jnp.int32))


def _write(end: jax.Array) -> Any:
  """The `update_cache` hook of `transformer.apply_layers_cached`: writes L slots at `end` (scalar or [B]).

  The block sees keys and values as [B, S, G, K]; the transposes to and from the stored
  [B, G, S, K] fold into the attention's dot, which contracts per (batch, head).
  """
  def update(kv, i, k_BLGK, v_BLGK):
    dtype = jax.tree.leaves(kv)[0].dtype
    scanned = isinstance(kv, dict)  # one stacked array, i traced
    axes = ("layers",) * scanned + CACHE_AXES
    layer = (i,) * scanned
    if end.ndim:  # per row: row b's L slots from end[b]; the indexed shape is [B, L, G, K], the new keys' own
      rows_B1 = jnp.arange(k_BLGK.shape[0])[:, None]
      slots_BL = end[:, None] + jnp.arange(k_BLGK.shape[1])[None]
      old = kv if scanned else kv[i]
      k, v = (constrain(old[name].at[(*layer, rows_B1, slice(None), slots_BL)].set(new.astype(dtype), mode="drop"),
                        axes) for name, new in (("k", k_BLGK), ("v", v_BLGK)))
    else:
      k_BGLK, v_BGLK = (x.transpose(0, 2, 1, 3).astype(dtype) for x in (k_BLGK, v_BLGK))
      if scanned:
        k, v = (constrain(jax.lax.dynamic_update_slice(kv[name], new[None], (i, 0, 0, end, 0)), axes)
                for name, new in (("k", k_BGLK), ("v", v_BGLK)))
      else:
        k, v = (constrain(jax.lax.dynamic_update_slice(kv[i][name], new, (0, 0, end, 0)), axes)
                for name, new in (("k", k_BGLK), ("v", v_BGLK)))
    if scanned:
      return {"k": k, "v": v}, k[i].transpose(0, 2, 1, 3), v[i].transpose(0, 2, 1, 3)
    return (*kv[:i], {"k": k, "v": v}, *kv[i + 1:]), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  return update


def extend_hidden(params: Params, cfg: ModelConfig, cache: KVCache,
                  tokens_BL: jax.Array) -> tuple[jax.Array, KVCache]:
  """Feeds L more tokens per row: writes their keys and values, returns every position's final hidden state.

  Row b's tokens take slots end[b], end[b] + 1, ... (one shared end: the same slots for all rows)
  and positions counted from start_B[b]. Hidden states [B, L, D] are before the final norm.
  """
  length = tokens_BL.shape[1]
  num_slots = jax.tree.leaves(cache.kv)[0].shape[-2]
  start_B1 = cache.start_B[:, None]
  end_B1 = jnp.broadcast_to(cache.end, cache.start_B.shape)[:, None]
  slots_BL = end_B1 + jnp.arange(length, dtype=jnp.int32)[None]
  slots_S = jnp.arange(num_slots, dtype=jnp.int32)
  q_positions_BL = jnp.maximum(slots_BL - start_B1, 0)
  kv_positions_BS = jnp.maximum(slots_S[None] - start_B1, 0)
  q_segments_BL = (slots_BL >= start_B1).astype(jnp.int32)
  kv_segments_BS = ((slots_S[None] >= start_B1) & (slots_S[None] < end_B1 + length)).astype(jnp.int32)
  mask_BLS = layers.attention_mask(q_segments_BL, kv_segments_BS, q_positions_BL, kv_positions_BS,
                                   cfg.sliding_window)
  x_BLD = transformer.embed(params, cfg, tokens_BL, q_positions_BL)
  x_BLD, kv = transformer.apply_layers_cached(params, cfg, x_BLD, mask_BLS, q_positions_BL, cache.kv,
                                              _write(cache.end))
  return x_BLD, cache._replace(kv=kv, end=cache.end + length)


def extend(params: Params, cfg: ModelConfig, cache: KVCache, tokens_BL: jax.Array) -> tuple[jax.Array, KVCache]:
  """Feeds L more tokens per row: writes their keys and values, returns the logits after the last.

  Prefill is this on an empty cache with the left-padded prompt; a decode step is this with
  L = 1. Logits [B, V] are float32.
  """
  x_BLD, cache = extend_hidden(params, cfg, cache, tokens_BL)
  return transformer.unembed(params, cfg, x_BLD[:, -1:])[:, 0], cache


def stop_matches(recent_BW: jax.Array, stop_MW: jax.Array) -> jax.Array:
  """Whether each row's most recent tokens end with any stop sequence.

  `recent_BW` holds the last W generated tokens (-1 before the first); stop sequences are
  right-aligned in `stop_MW` with -1 on the left where they are shorter than W.
  """
  care_MW = stop_MW >= 0
  equal_BMW = (recent_BW[:, None, :] == stop_MW[None]) | ~care_MW[None]
  return jnp.any(jnp.all(equal_BMW, axis=-1) & jnp.any(care_MW, axis=-1)[None], axis=-1)


def token_log_probs(logits_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  log_probs_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs_BV, tokens_B[:, None], axis=-1)[:, 0]


class _LoopState(NamedTuple):
  step: jax.Array  # tokens generated so far
  logits_BV: jax.Array  # for the next token
  cache: KVCache
  tokens_BT: jax.Array
  log_probs_BT: jax.Array
  recent_BW: jax.Array
  done_B: jax.Array
  reason_B: jax.Array
  length_B: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "cache_len"))
def sample_loop(params: Params, prompt_BP: jax.Array, start_B: jax.Array, max_new_tokens: jax.Array,
                rng: jax.Array, eos_id: jax.Array, stop_MW: jax.Array, *, cfg: ModelConfig, sampler: Sampler,
                cache_len: int) -> tuple[jax.Array, ...]:
  """Prefill, then one `lax.while_loop` that samples until every row stopped or the budget is spent.

  Returns (tokens_BT, log_probs_BT, length_B, reason_B): row b's tokens are the first
  length_B[b] of tokens_BT, and reason_B indexes FINISH_REASONS. Row b draws with key
  fold_in(fold_in(rng, b), step): its randomness depends on the seed, its row index and its
  step only, never on the other rows or on padding.
  """
  batch, prompt_len = prompt_BP.shape
  num_new = cache_len - prompt_len
  logits_BV, cache = extend(params, cfg, init_cache(params, cfg, start_B, cache_len), prompt_BP)
  row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(batch))

  def pick(s: _LoopState) -> _LoopState:
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, s.step)
    tokens_B = jax.vmap(lambda logits_V, key: sampler(logits_V[None], key)[0])(s.logits_BV, keys_B)
    log_probs_B = token_log_probs(s.logits_BV, tokens_B)
    tokens_B = jnp.where(s.done_B, 0, tokens_B)
    log_probs_B = jnp.where(s.done_B, 0.0, log_probs_B)
    recent_BW = jnp.concatenate([s.recent_BW[:, 1:], tokens_B[:, None]], axis=1)
    hit_eos_B = ~s.done_B & (tokens_B == eos_id)
    hit_stop_B = ~s.done_B & ~hit_eos_B & stop_matches(recent_BW, stop_MW)
    return s._replace(
        step=s.step + 1,
        tokens_BT=jax.lax.dynamic_update_slice(s.tokens_BT, tokens_B[:, None], (0, s.step)),
        log_probs_BT=jax.lax.dynamic_update_slice(s.log_probs_BT, log_probs_B[:, None], (0, s.step)),
        recent_BW=recent_BW,
        done_B=s.done_B | hit_eos_B | hit_stop_B,
        reason_B=jnp.where(hit_eos_B, _EOS, jnp.where(hit_stop_B, _STOP, s.reason_B)),
        length_B=jnp.where(s.done_B, s.length_B, s.step + 1))

  def body(s: _LoopState) -> _LoopState:
    last_B1 = jax.lax.dynamic_slice_in_dim(s.tokens_BT, s.step - 1, 1, axis=1)
    logits_BV, cache = extend(params, cfg, s.cache, last_B1)
    return pick(s._replace(logits_BV=logits_BV, cache=cache))

  def cond(s: _LoopState) -> jax.Array:
    return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

  state = _LoopState(
      step=jnp.zeros((), jnp.int32), logits_BV=logits_BV, cache=cache,
      tokens_BT=jnp.zeros((batch, num_new), jnp.int32), log_probs_BT=jnp.zeros((batch, num_new), jnp.float32),
      recent_BW=jnp.full((batch, stop_MW.shape[1]), -1, jnp.int32), done_B=jnp.zeros((batch,), bool),
      reason_B=jnp.zeros((batch,), jnp.int32), length_B=jnp.zeros((batch,), jnp.int32))
  state = jax.lax.while_loop(cond, body, pick(state))
  return state.tokens_BT, state.log_probs_BT, state.length_B, state.reason_B


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """The compiled length for n: the next power of two, at least `minimum`."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def prepare(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, cfg: ModelConfig,
            stop: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
  """Left-padded prompts [B, P], each row's first real slot, the cache length and the stop table.

  Raises a UserError for an empty prompt or one that would run past the model's max_len.
  """
  if not prompt_ids:
    raise UserError("no prompts given")
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens={max_new_tokens}: expected at least 1")
  lengths = [len(p) for p in prompt_ids]
  if min(lengths) == 0:
    raise UserError("an empty prompt: give every prompt at least one token (e.g. the bos id)")
  if max(lengths) + max_new_tokens > cfg.max_len:
    raise UserError(f"prompt of {max(lengths)} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                    f"max_len={cfg.max_len}; shorten the prompt or lower max_new_tokens")
  prompt_len = bucket(max(lengths))
  prompt_BP = np.zeros((len(prompt_ids), prompt_len), np.int32)
  for row, ids in enumerate(prompt_ids):
    prompt_BP[row, prompt_len - len(ids):] = ids
  start_B = np.asarray([prompt_len - n for n in lengths], np.int32)
  stops = [list(s) for s in stop if len(s)]
  width = max([1] + [len(s) for s in stops])
  stop_MW = np.full((len(stops), width), -1, np.int32)
  for row, ids in enumerate(stops):
    stop_MW[row, width - len(ids):] = ids
  return prompt_BP, start_B, bucket(prompt_len + max_new_tokens), stop_MW
