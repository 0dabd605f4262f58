"""The serving engine's two compiled functions: a prefill that puts one request into a slot, and one decode step for all slots.

The engine's KV cache has B rows (slots) of S positions and a per-row `end`: row b holds its
request's tokens in positions [0, end[b]) and nothing before them (start 0, no padding), so each
row moves on its own. A prefill runs the prompt, right-padded to its length bucket P, on a fresh
one-row cache of P positions and copies that row into slot `row`; the pad positions after the
prompt are written too but lie at and after end[row], where the mask hides them and the next
decode steps overwrite them. A decode step feeds every row its last token (each writes at its own
end), and rows that are not active keep their end, so an idle slot only rewrites one position.

Both functions take the sampling settings as traced arrays (`strategies.sample_rows`) and donate
the cache: the prefill compiles once per prompt bucket, the decode step once, whatever the
requests ask for. Row randomness is `fold_in(fold_in(key(seed), 0), step)`, what `generate` gives
a prompt alone with that seed, so a seeded request draws the tokens `generate` would.

Dimension letters as in sampling/decode.py (B slots, P prompt bucket, S cache positions, V vocab).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.model import transformer
from llm_jax.sampling import decode, strategies

Params = dict[str, Any]


def new_cache(params: Params, cfg: ModelConfig, slots: int, cache_len: int) -> decode.KVCache:
  """An empty cache of `slots` rows of `cache_len` positions, each row with its own end."""
  cache = decode.init_cache(params, cfg, jnp.zeros((slots,), jnp.int32), cache_len)
  return cache._replace(end=jnp.zeros((slots,), jnp.int32))


def _pick(logits_BV: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array, seed_B: jax.Array,
          step_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each row's next token under its own settings, and the model's log-probability of it."""
  keys_B = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), step))(
      seed_B, step_B)
  tokens_B = strategies.sample_rows(logits_BV, temperature_B, top_p_B, keys_B)
  return tokens_B, decode.token_log_probs(logits_BV, tokens_B)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(params: Params, cache: decode.KVCache, row: jax.Array, prompt_1P: jax.Array, length: jax.Array,
            temperature: jax.Array, top_p: jax.Array, seed: jax.Array, *,
            cfg: ModelConfig) -> tuple[jax.Array, jax.Array, decode.KVCache]:
  """Writes a prompt (its first `length` tokens real) into slot `row`; returns its first token, that token's
  log-probability, and the cache."""
  fresh = decode.init_cache(params, cfg, jnp.zeros((1,), jnp.int32), prompt_1P.shape[1])
  x_1PD, fresh = decode.extend_hidden(params, cfg, fresh, prompt_1P)
  logits_1V = transformer.unembed(params, cfg, jax.lax.dynamic_slice_in_dim(x_1PD, length - 1, 1, axis=1))[:, 0]
  kv = jax.tree.map(lambda all_, one: jax.lax.dynamic_update_slice(all_, one, (0,) * (all_.ndim - 4) + (row, 0, 0, 0)),
                    cache.kv, fresh.kv)
  cache = cache._replace(kv=kv, end=cache.end.at[row].set(length))
  tokens_1, log_probs_1 = _pick(logits_1V, temperature[None], top_p[None], seed[None], jnp.zeros((1,), jnp.int32))
  return tokens_1[0], log_probs_1[0], cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(params: Params, cache: decode.KVCache, tokens_B: jax.Array, active_B: jax.Array,
                temperature_B: jax.Array, top_p_B: jax.Array, seed_B: jax.Array, step_B: jax.Array, *,
                cfg: ModelConfig) -> tuple[jax.Array, jax.Array, decode.KVCache]:
  """Feeds each slot its last token and draws its next (step_B: how many it has drawn); idle slots keep their end."""
  logits_BV, moved = decode.extend(params, cfg, cache, tokens_B[:, None])
  cache = moved._replace(end=jnp.where(active_B, moved.end, cache.end))
  tokens_B, log_probs_B = _pick(logits_BV, temperature_B, top_p_B, seed_B, step_B)
  return tokens_B, log_probs_B, cache
