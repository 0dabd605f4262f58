"""Text generation: strategies (strategies.py), KV cache and decode loop (decode.py), beam search (beam.py).

    completions = sampling.generate(params, cfg, [[5, 6, 7], [8, 9]], max_new_tokens=20, eos_id=2)
    texts = sampling.generate_text(params, cfg, tokenizer, ["Once upon"], max_new_tokens=50, temperature=0.8)

The sampler imports the model, never the trainer. See docs/sampling.md.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import UserError
from llm_jax.sampling import beam, decode, speculative
from llm_jax.sampling.decode import Completion, KVCache, extend, init_cache
from llm_jax.sampling.strategies import (Sampler, categorical, greedy, scale_by_temperature, top_k_filter,
                                         top_p_filter)

__all__ = ["Completion", "KVCache", "Sampler", "categorical", "extend", "generate", "generate_text", "greedy",
           "init_cache", "scale_by_temperature", "top_k_filter", "top_p_filter"]


def _params_mesh(params: Any) -> jax.sharding.Mesh | None:
  """The mesh sharded parameters live on, so a caller that did not enter it still runs sharded."""
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


def generate(params: Any, cfg: ModelConfig, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
             length_penalty: float = 1.0, seed: int = 0, eos_id: int | None = None,
             stop: Sequence[Sequence[int]] = (), draft: tuple[Any, ModelConfig] | None = None,
             speculate: int = 4) -> list[Completion]:
  """Continues each prompt (token ids; lengths may differ) by up to max_new_tokens tokens.

  A row stops after `eos_id`, after any `stop` token sequence (matched in the generated
  tokens), or after max_new_tokens. Same seed, same prompts: same output. num_beams > 1 runs
  beam search, which is deterministic (temperature, top_k and top_p must stay off) and scores
  sum(log p) / length ** length_penalty. Sharded parameters run sharded (on their own mesh when
  the caller has not entered one with `jax.set_mesh`). `draft` (parameters and config of a smaller
  model with the same tokenizer) decodes speculatively, `speculate` proposals per target pass: the
  same tokens when greedy, the same distribution when sampling (speculative.py).
  """
  sampler = Sampler(temperature, top_k, top_p)
  if num_beams < 1:
    raise UserError(f"num_beams={num_beams}: expected at least 1")
  if draft is not None:
    if num_beams > 1:
      raise UserError("speculative decoding samples or decodes greedily; drop num_beams, or the draft model")
    return speculative.generate(params, cfg, *draft, prompt_ids, max_new_tokens=max_new_tokens, num_draft=speculate,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id,
                                stop=stop).completions
  if num_beams > 1 and (temperature or top_k or top_p < 1):
    raise UserError("beam search is deterministic: leave temperature 0, top_k 0 and top_p 1 with num_beams > 1")
  prompt_BP, start_B, cache_len, stop_MW = decode.prepare(prompt_ids, max_new_tokens, cfg, stop)
  eos = np.int32(-1 if eos_id is None else eos_id)
  mesh = _params_mesh(params) if jax.sharding.get_abstract_mesh().empty else None
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    if num_beams > 1:
      outputs = beam.beam_search_loop(params, prompt_BP, start_B, np.int32(max_new_tokens), eos, stop_MW,
                                      np.float32(length_penalty), cfg=cfg, num_beams=num_beams, cache_len=cache_len)
      tokens_BT, log_probs_BT, length_B, reason_B, score_B = jax.device_get(outputs)
    else:
      outputs = decode.sample_loop(params, prompt_BP, start_B, np.int32(max_new_tokens), jax.random.key(seed), eos,
                                   stop_MW, cfg=cfg, sampler=sampler, cache_len=cache_len)
      tokens_BT, log_probs_BT, length_B, reason_B = jax.device_get(outputs)
      score_B = [log_probs_BT[b, :n].sum() for b, n in enumerate(length_B)]
  return [Completion(tokens=tokens_BT[b, :n].tolist(), log_probs=log_probs_BT[b, :n].tolist(),
                     finish_reason=decode.FINISH_REASONS[reason_B[b]], score=float(score_B[b]))
          for b, n in enumerate(length_B)]


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
  found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return min(found) if found else None


def _finish(tokenizer: Any, prompt: str, prompt_ids: list[int], completion: Completion,
            stop: Sequence[str]) -> dict[str, Any]:
  """Decodes a completion and cuts it at the first stop string, in the text and in the tokens.

  The loop matches stop strings as token sequences, which a tokenizer may split differently
  in generated text; the text check here is what guarantees the cut. The text excludes the eos
  token and the stop string; the ids and log-probs run up to the token that completed it.
  """
  tokens, log_probs, reason = completion.tokens, completion.log_probs, completion.finish_reason
  body = tokens[:-1] if reason == "eos" else tokens
  text = tokenizer.decode(body)
  cut = _first_stop(text, stop)
  if cut is not None:
    n = next(k for k in range(1, len(body) + 1) if _first_stop(tokenizer.decode(body[:k]), stop) is not None)
    text, tokens, log_probs, reason = text[:cut], body[:n], log_probs[:n], "stop"
  return {"prompt": prompt, "text": text, "prompt_token_ids": prompt_ids, "token_ids": tokens,
          "log_probs": log_probs, "finish_reason": reason, "score": completion.score}


def generate_text(params: Any, model_cfg: ModelConfig, tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
                  length_penalty: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                  return_details: bool = False, draft: tuple[Any, ModelConfig] | None = None,
                  speculate: int = 4) -> list[str] | list[dict[str, Any]]:
  """The generated text of each prompt, or with return_details a dict per prompt.

  A prompt is conditioned on exactly `tokenizer.encode(prompt)`. An empty one is conditioned on
  the bos token alone, on purpose: that is how Llama-family models were trained to begin, while
  a model trained by llm-jax never saw any token before a document's first one (its segments
  start with the text itself and the loss never crosses the eos between documents), so no
  token, eos included, would be what it trained on: give such a model some text.

  Rows stop at the tokenizer's eos, at a `stop` string or after max_new_tokens. The dict holds
  prompt, text, prompt_token_ids, token_ids, log_probs (the model's, per generated token),
  finish_reason ("eos", "stop" or "length") and score. `draft` and `speculate`: as for `generate`.
  """
  prompt_ids = [list(tokenizer.encode(p)) or [tokenizer.bos_id] for p in prompts]
  stop_ids = [[i for i in tokenizer.encode(s) if i != tokenizer.bos_id] for s in stop]
  completions = generate(params, model_cfg, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty, seed=seed,
                         eos_id=tokenizer.eos_id, stop=stop_ids, draft=draft, speculate=speculate)
  results = [_finish(tokenizer, p, ids, c, stop) for p, ids, c in zip(prompts, prompt_ids, completions)]
  return results if return_details else [r["text"] for r in results]
