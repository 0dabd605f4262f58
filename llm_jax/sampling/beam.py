"""Beam search over the same cache, prefill and `extend` as sampling, in one jitted while loop.

Each prompt keeps W alive beams and its best finished hypothesis. A step expands every alive
beam by every token and takes the 2W best candidates by summed log-probability; those that end
(eos or a stop sequence) count as finished only if they rank among the first W (as in Hugging
Face, so one beam with no length penalty is exactly greedy), and the W best others stay alive. A finished hypothesis scores sum(log p) / length ** length_penalty, length counting the
token that ended it.

Only the best hypothesis is returned, so a prompt is done once no alive beam can still beat
the best finished one: log p <= 0 makes an alive sum only fall, so its best future score is
sum / max_new ** penalty for a positive penalty and sum / length ** penalty otherwise.
Stopping there returns exactly what running to max_new_tokens would. At the end, beams still
alive count as hypotheses cut by the length limit.

Dimension letters as in decode.py, plus C = 2W candidates and X the longest stop sequence.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.sampling.decode import FINISH_REASONS, KVCache, extend, init_cache, stop_matches

Params = dict[str, Any]
_EOS, _STOP, _LENGTH = (FINISH_REASONS.index(r) for r in ("eos", "stop", "length"))


class _BeamState(NamedTuple):
  step: jax.Array  # tokens generated so far
  logits_RV: jax.Array  # R = B x W rows, beam w of prompt b in row b * W + w
  cache: KVCache
  alive_tokens_BWT: jax.Array
  alive_log_probs_BWT: jax.Array
  alive_sum_BW: jax.Array  # -inf marks an empty beam
  alive_recent_BWX: jax.Array
  best_tokens_B1T: jax.Array
  best_log_probs_B1T: jax.Array
  best_score_B1: jax.Array  # -inf until a hypothesis finished
  best_length_B1: jax.Array
  best_reason_B1: jax.Array


def _take(x_BC: jax.Array, index_BW: jax.Array) -> jax.Array:
  """Gathers along axis 1 (candidates or beams) of [B, C, ...] by [B, W] indices."""
  index = index_BW.reshape(index_BW.shape + (1,) * (x_BC.ndim - 2))
  return jnp.take_along_axis(x_BC, index, axis=1)


def _length_norm(length: jax.Array, length_penalty: jax.Array) -> jax.Array:
  return jnp.power(length.astype(jnp.float32), length_penalty)


@functools.partial(jax.jit, static_argnames=("cfg", "num_beams", "cache_len"))
def beam_search_loop(params: Params, prompt_BP: jax.Array, start_B: jax.Array, max_new_tokens: jax.Array,
                     eos_id: jax.Array, stop_MX: jax.Array, length_penalty: jax.Array, *, cfg: ModelConfig,
                     num_beams: int, cache_len: int) -> tuple[jax.Array, ...]:
  """The best hypothesis per prompt: (tokens_BT, log_probs_BT, length_B, reason_B, score_B)."""
  batch, prompt_len = prompt_BP.shape
  beams, num_new = num_beams, cache_len - prompt_len
  logits_BV, cache = extend(params, cfg, init_cache(params, cfg, start_B, cache_len), prompt_BP)
  vocab = logits_BV.shape[-1]
  # Every beam of a prompt starts from its one prefill; only beam 0 is alive at first.
  cache = cache._replace(kv=jax.tree.map(lambda x: jnp.repeat(x, beams, axis=x.ndim - 4), cache.kv),
                         start_B=jnp.repeat(cache.start_B, beams))
  alive_sum_BW = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)[None].repeat(batch, 0)

  def select(s: _BeamState) -> _BeamState:
    log_probs_BWV = jax.nn.log_softmax(s.logits_RV.astype(jnp.float32), axis=-1).reshape(batch, beams, vocab)
    total_BWV = s.alive_sum_BW[:, :, None] + log_probs_BWV
    sum_BC, index_BC = jax.lax.top_k(total_BWV.reshape(batch, beams * vocab), 2 * beams)
    parent_BC, token_BC = index_BC // vocab, (index_BC % vocab).astype(jnp.int32)
    token_log_prob_BC = jnp.take_along_axis(log_probs_BWV.reshape(batch, beams * vocab), index_BC, axis=1)
    tokens_BCT = _take(s.alive_tokens_BWT, parent_BC).at[:, :, s.step].set(token_BC)
    log_probs_BCT = _take(s.alive_log_probs_BWT, parent_BC).at[:, :, s.step].set(token_log_prob_BC)
    recent_BCX = jnp.concatenate([_take(s.alive_recent_BWX, parent_BC)[:, :, 1:], token_BC[:, :, None]], axis=2)
    is_eos_BC = token_BC == eos_id
    is_stop_BC = ~is_eos_BC & stop_matches(recent_BCX.reshape(batch * 2 * beams, -1), stop_MX).reshape(batch, -1)
    ends_BC = is_eos_BC | is_stop_BC

    alive_sum_BW, keep_BW = jax.lax.top_k(jnp.where(ends_BC, -jnp.inf, sum_BC), beams)
    length = s.step + 1
    in_top_w_BC = jnp.arange(2 * beams)[None] < beams
    score_BC = jnp.where(ends_BC & in_top_w_BC, sum_BC / _length_norm(length, length_penalty), -jnp.inf)
    best = _keep_best(s, score_BC, tokens_BCT, log_probs_BCT, jnp.full_like(token_BC, length),
                      jnp.where(is_eos_BC, _EOS, _STOP))
    # Reorder the cache so row b * W + w holds the history of the new beam w.
    rows_R = (jnp.arange(batch)[:, None] * beams + _take(parent_BC, keep_BW)).reshape(-1)
    kv = jax.tree.map(lambda x: jnp.take(x, rows_R, axis=x.ndim - 4), s.cache.kv)
    return s._replace(step=length, cache=s.cache._replace(kv=kv), alive_tokens_BWT=_take(tokens_BCT, keep_BW),
                      alive_log_probs_BWT=_take(log_probs_BCT, keep_BW), alive_sum_BW=alive_sum_BW,
                      alive_recent_BWX=_take(recent_BCX, keep_BW), **best)

  def body(s: _BeamState) -> _BeamState:
    last_R1 = jax.lax.dynamic_slice_in_dim(s.alive_tokens_BWT, s.step - 1, 1, axis=2).reshape(-1, 1)
    logits_RV, cache = extend(params, cfg, s.cache, last_R1)
    return select(s._replace(logits_RV=logits_RV, cache=cache))

  def cond(s: _BeamState) -> jax.Array:
    denominator = _length_norm(jnp.where(length_penalty > 0, max_new_tokens, s.step), length_penalty)
    best_possible_B = jnp.max(s.alive_sum_BW, axis=1) / denominator
    done_B = (best_possible_B < s.best_score_B1[:, 0]) | jnp.all(s.alive_sum_BW == -jnp.inf, axis=1)
    return (s.step < max_new_tokens) & ~jnp.all(done_B)

  empty_BWT = jnp.zeros((batch, beams, num_new), jnp.int32)
  empty_B1 = jnp.zeros((batch, 1), jnp.int32)
  state = _BeamState(
      step=jnp.zeros((), jnp.int32), logits_RV=jnp.repeat(logits_BV, beams, axis=0), cache=cache,
      alive_tokens_BWT=empty_BWT, alive_log_probs_BWT=empty_BWT.astype(jnp.float32), alive_sum_BW=alive_sum_BW,
      alive_recent_BWX=jnp.full((batch, beams, stop_MX.shape[1]), -1, jnp.int32),
      best_tokens_B1T=empty_BWT[:, :1], best_log_probs_B1T=empty_BWT[:, :1].astype(jnp.float32),
      best_score_B1=jnp.full((batch, 1), -jnp.inf), best_length_B1=empty_B1, best_reason_B1=empty_B1)
  s = jax.lax.while_loop(cond, body, select(state))
  # Beams still alive are hypotheses cut by the length limit (if the loop stopped early they
  # score below the best finished, so they change nothing).
  best = _keep_best(s, s.alive_sum_BW / _length_norm(s.step, length_penalty), s.alive_tokens_BWT,
                    s.alive_log_probs_BWT, jnp.full_like(s.alive_sum_BW, s.step, jnp.int32),
                    jnp.full_like(s.alive_sum_BW, _LENGTH, jnp.int32))
  return (best["best_tokens_B1T"][:, 0], best["best_log_probs_B1T"][:, 0], best["best_length_B1"][:, 0],
          best["best_reason_B1"][:, 0], best["best_score_B1"][:, 0])


def _keep_best(s: _BeamState, score_BC: jax.Array, tokens_BCT: jax.Array, log_probs_BCT: jax.Array,
               length_BC: jax.Array, reason_BC: jax.Array) -> dict[str, jax.Array]:
  """The better of the best so far and the new hypotheses (score -inf: not a hypothesis)."""
  score_B1, keep_B1 = jax.lax.top_k(jnp.concatenate([s.best_score_B1, score_BC], axis=1), 1)
  pick = lambda old, new: _take(jnp.concatenate([old, new], axis=1), keep_B1)  # noqa: E731
  return dict(best_score_B1=score_B1, best_tokens_B1T=pick(s.best_tokens_B1T, tokens_BCT),
              best_log_probs_B1T=pick(s.best_log_probs_B1T, log_probs_BCT),
              best_length_B1=pick(s.best_length_B1, length_BC), best_reason_B1=pick(s.best_reason_B1, reason_BC))
