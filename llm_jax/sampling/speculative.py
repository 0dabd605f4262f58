"""Speculative decoding: a small draft model proposes J tokens, the target checks them all in one forward pass.

A round, for every row at once: the draft feeds the row's pending token (accepted, not yet in
either cache) and then its own proposals d_1..d_J, drawing each from its distribution q; the
target feeds [pending, d_1..d_J] in one `extend` and gets its distributions p_0..p_J at those
positions. `verify` accepts d_i while u_i < p(d_i) / q(d_i) (u uniform); at the first rejection it
draws the next token from the residual max(0, p - q), normalised, and if all J pass it draws a
bonus token from p_J. Each emitted token is then distributed exactly as the target's own sampler
would draw it (Leviathan et al. 2023, Chen et al. 2023): speculation changes the speed, never the
distribution. The distributions are those `Sampler` samples from (temperature, top-k, top-p); greedy
makes them one-hot, and the same rule then accepts d_i exactly when it is the target's argmax and
otherwise emits that argmax: greedy speculative output is the target's greedy output.

Both caches then keep the pending token and the accepted proposals and roll their per-row `end`
back over the rest (the rejected slots stay written but lie past the end, where nothing sees them
and the next round overwrites them), so rows advance by different amounts: the KV cache's per-row
end (decode.KVCache). A row stops once it emitted eos or max_new_tokens; stop sequences and the
exact cut are applied to the returned tokens, as `generate` would have stopped there.

Dimension letters as in decode.py, plus J the draft's proposals per round (and J1 = J + 1).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import UserError
from llm_jax.model import transformer
from llm_jax.sampling import decode
from llm_jax.sampling.decode import Completion
from llm_jax.sampling.strategies import Sampler

Params = dict[str, Any]


def probabilities(logits_BV: jax.Array, sampler: Sampler) -> jax.Array:
  """The distribution `sampler` draws from: softmax of the filtered logits, or one-hot on the argmax when greedy."""
  if sampler.is_greedy:
    return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(sampler.filter(logits_BV), axis=-1)


def verify(p_J1V: jax.Array, q_JV: jax.Array, draft_J: jax.Array, u_J: jax.Array,
           key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One row's accept/reject: (how many proposals are accepted, 0..J; the token that follows them).

  p_J1V: the target's distributions at the J + 1 positions; q_JV: the draft's at the first J, from
  which draft_J was drawn; u_J: uniform draws in [0, 1).
  """
  num = draft_J.shape[0]
  p_draft_J = p_J1V[jnp.arange(num), draft_J]
  q_draft_J = q_JV[jnp.arange(num), draft_J]
  accepted = jnp.sum(jnp.cumprod(u_J * q_draft_J < p_draft_J))  # u < p / q, with q > 0 where the draft drew
  q_J1V = jnp.concatenate([q_JV, jnp.zeros_like(q_JV[:1])])  # after J acceptances the residual is p_J itself
  residual_V = jnp.maximum(p_J1V[accepted] - q_J1V[accepted], 0.0)
  return accepted, jax.random.categorical(key, jnp.log(residual_V)).astype(jnp.int32)


class _State(NamedTuple):
  round: jax.Array
  pending_B: jax.Array  # the last emitted token, in neither cache yet
  cache: decode.KVCache
  draft_cache: decode.KVCache
  tokens_BT: jax.Array
  log_probs_BT: jax.Array
  count_B: jax.Array  # tokens emitted so far
  done_B: jax.Array
  proposed: jax.Array  # draft tokens offered to the target, over live rows
  accepted: jax.Array  # of which accepted


def _per_row(cache: decode.KVCache) -> decode.KVCache:
  return cache._replace(end=jnp.broadcast_to(cache.end, cache.start_B.shape))


@functools.partial(jax.jit, static_argnames=("cfg", "draft_cfg", "sampler", "num_draft", "cache_len"))
def speculative_loop(params: Params, draft_params: Params, prompt_BP: jax.Array, start_B: jax.Array,
                     max_new_tokens: jax.Array, rng: jax.Array, eos_id: jax.Array, *, cfg: ModelConfig,
                     draft_cfg: ModelConfig, sampler: Sampler, num_draft: int,
                     cache_len: int) -> tuple[jax.Array, ...]:
  """Prefill both models, then rounds of J proposals and one verification until every row is done.

  Returns (tokens_BT, log_probs_BT, count_B, proposed, accepted): row b emitted the first count_B[b]
  tokens of tokens_BT (possibly past eos or max_new_tokens: the caller cuts), log_probs_BT are the
  target's own log-probabilities of them. Row b's randomness is fold_in(fold_in(rng, b), round).
  """
  batch = prompt_BP.shape[0]
  width = cache_len - prompt_BP.shape[1]  # room for max_new_tokens plus one round's overshoot
  logits_BV, cache = decode.extend(params, cfg, decode.init_cache(params, cfg, start_B, cache_len), prompt_BP)
  _, draft_cache = decode.extend(draft_params, draft_cfg, decode.init_cache(draft_params, draft_cfg, start_B, cache_len),
                                 prompt_BP)
  row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(batch))
  first_keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, 0)
  first_B = jax.vmap(lambda logits_V, key: sampler(logits_V[None], key)[0])(logits_BV, first_keys_B)
  state = _State(
      round=jnp.ones((), jnp.int32), pending_B=first_B, cache=_per_row(cache), draft_cache=_per_row(draft_cache),
      tokens_BT=jnp.zeros((batch, width), jnp.int32).at[:, 0].set(first_B),
      log_probs_BT=jnp.zeros((batch, width), jnp.float32).at[:, 0].set(decode.token_log_probs(logits_BV, first_B)),
      count_B=jnp.ones((batch,), jnp.int32), done_B=(first_B == eos_id) | (max_new_tokens <= 1),
      proposed=jnp.zeros((), jnp.int32), accepted=jnp.zeros((), jnp.int32))

  def body(s: _State) -> _State:
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, s.round)
    split_B3 = jax.vmap(lambda k: jax.random.split(k, 3))(keys_B)
    draw_BJ = jax.vmap(lambda k: jax.random.split(k, num_draft))(split_B3[:, 0])
    u_BJ = jax.vmap(lambda k: jax.random.uniform(k, (num_draft,)))(split_B3[:, 1])
    draft_cache, token_B, drafts, qs = s.draft_cache, s.pending_B, [], []
    for j in range(num_draft + 1):  # the last feed only writes d_J, so the draft's cache holds every proposal
      draft_logits_BV, draft_cache = decode.extend(draft_params, draft_cfg, draft_cache, token_B[:, None])
      if j < num_draft:
        q_BV = probabilities(draft_logits_BV, sampler)
        token_B = jax.vmap(lambda q_V, k: jax.random.categorical(k, jnp.log(q_V)))(q_BV, draw_BJ[:, j]).astype(jnp.int32)
        drafts.append(token_B)
        qs.append(q_BV)
    draft_BJ, q_BJV = jnp.stack(drafts, axis=1), jnp.stack(qs, axis=1)
    fed_BJ1 = jnp.concatenate([s.pending_B[:, None], draft_BJ], axis=1)
    x_BJ1D, cache = decode.extend_hidden(params, cfg, s.cache, fed_BJ1)
    logits_BJ1V = transformer.unembed(params, cfg, x_BJ1D)
    p_BJ1V = probabilities(logits_BJ1V, sampler)
    accepted_B, next_B = jax.vmap(verify)(p_BJ1V, q_BJV, draft_BJ, u_BJ, split_B3[:, 2])
    live_B = ~s.done_B
    emitted_BJ1 = jnp.concatenate([draft_BJ, jnp.zeros_like(draft_BJ[:, :1])], axis=1)
    emitted_BJ1 = jnp.where(jnp.arange(num_draft + 1)[None] == accepted_B[:, None], next_B[:, None], emitted_BJ1)
    log_probs_BJ1 = jnp.take_along_axis(jax.nn.log_softmax(logits_BJ1V, axis=-1), emitted_BJ1[..., None], axis=-1)[..., 0]
    keep_BJ1 = (jnp.arange(num_draft + 1)[None] <= accepted_B[:, None]) & live_B[:, None]
    index_BJ1 = jnp.where(keep_BJ1, s.count_B[:, None] + jnp.arange(num_draft + 1)[None], width)  # width: dropped
    rows_B1 = jnp.arange(batch)[:, None]
    advance_B = jnp.where(live_B, accepted_B + 1, 0)
    end_B = s.cache.end + advance_B
    count_B = s.count_B + advance_B
    hit_eos_B = jnp.any(keep_BJ1 & (emitted_BJ1 == eos_id), axis=1)
    return _State(
        round=s.round + 1, pending_B=jnp.where(live_B, next_B, s.pending_B),
        cache=cache._replace(end=end_B), draft_cache=draft_cache._replace(end=end_B),
        tokens_BT=s.tokens_BT.at[rows_B1, index_BJ1].set(emitted_BJ1, mode="drop"),
        log_probs_BT=s.log_probs_BT.at[rows_B1, index_BJ1].set(log_probs_BJ1, mode="drop"),
        count_B=count_B, done_B=s.done_B | hit_eos_B | (count_B >= max_new_tokens),
        proposed=s.proposed + num_draft * jnp.sum(live_B), accepted=s.accepted + jnp.sum(jnp.where(live_B, accepted_B, 0)))

  state = jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), body, state)
  return state.tokens_BT, state.log_probs_BT, state.count_B, state.proposed, state.accepted


def _cut(tokens: list[int], log_probs: list[float], max_new: int, eos_id: int | None,
         stop: Sequence[Sequence[int]]) -> Completion:
  """A row's emitted tokens cut where `generate` would have stopped: max_new, eos, or a stop sequence's end."""
  tokens, log_probs = tokens[:max_new], log_probs[:max_new]
  for n in range(1, len(tokens) + 1):
    reason = "eos" if tokens[n - 1] == eos_id else "stop" if any(
        len(s) and tokens[:n][-len(s):] == list(s) for s in stop) else None
    if reason:
      return Completion(tokens[:n], log_probs[:n], reason, float(sum(log_probs[:n])))
  return Completion(tokens, log_probs, "length", float(sum(log_probs)))


class Result(NamedTuple):
  completions: list[Completion]
  acceptance_rate: float  # accepted draft tokens / proposed ones


def generate(params: Params, cfg: ModelConfig, draft_params: Params, draft_cfg: ModelConfig,
             prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, num_draft: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             stop: Sequence[Sequence[int]] = ()) -> Result:
  """`sampling.generate` with a draft model proposing `num_draft` tokens per target forward pass."""
  if num_draft < 1:
    raise UserError(f"--speculate {num_draft}: expected at least 1 draft token per round")
  if draft_cfg.vocab_size != cfg.vocab_size:
    raise UserError(f"the draft model's vocabulary has {draft_cfg.vocab_size} tokens but the target's has "
                    f"{cfg.vocab_size}; a draft must share the target's tokenizer")
  sampler = Sampler(temperature, top_k, top_p)
  prompt_BP, start_B, _, _ = decode.prepare(prompt_ids, max_new_tokens, cfg, ())
  cache_len = decode.bucket(prompt_BP.shape[1] + max_new_tokens + num_draft + 1)
  outputs = speculative_loop(params, draft_params, prompt_BP, start_B, np.int32(max_new_tokens), jax.random.key(seed),
                             np.int32(-1 if eos_id is None else eos_id), cfg=cfg, draft_cfg=draft_cfg, sampler=sampler,
                             num_draft=num_draft, cache_len=cache_len)
  tokens_BT, log_probs_BT, count_B, proposed, accepted = jax.device_get(outputs)
  completions = [_cut(tokens_BT[b, :n].tolist(), log_probs_BT[b, :n].tolist(), max_new_tokens, eos_id, stop)
                 for b, n in enumerate(count_B)]
  return Result(completions, float(accepted) / max(1, int(proposed)))
