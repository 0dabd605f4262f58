"""Sampling: the KV cache against full recomputation, padding, strategies, beam search, stopping, sharding.

Models use init_std 0.2 so their next-token distributions are peaked: greedy choices then have
clear margins, and a wrong cache entry or position changes them instead of hiding in a tie.
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import sampling, sharding
from llm_jax.config import MeshConfig
from llm_jax.data import tokenizer
from llm_jax.errors import UserError
from llm_jax.model import presets, transformer
from llm_jax.sampling import decode, strategies

GPT2 = dataclasses.replace(presets.get("tiny-gpt2"), init_std=0.2)
LLAMA = dataclasses.replace(presets.get("tiny-llama"), init_std=0.2)  # 4 heads, 2 kv heads (GQA)
PROMPTS = [[5, 17, 33, 2, 90], [7, 8], [40, 41, 42, 43, 44, 45, 46]]  # lengths 5, 2, 7 in one batch


@functools.lru_cache(maxsize=None)
def params_for(cfg, seed=0):
  return transformer.init_params(cfg, jax.random.key(seed))


def params_in_layout(cfg):
  """The same weights for scanned and unscanned variants of a config, in the variant's layout."""
  params = params_for(dataclasses.replace(cfg, scan_layers=True))
  return params if cfg.scan_layers else transformer.unstack_layers(params)


@functools.lru_cache(maxsize=None)
def _jit_forward(cfg):
  return jax.jit(functools.partial(transformer.forward, cfg=cfg))


def recomputed_logits(params, cfg, sequences, width=16):
  """Last-token logits of each sequence from a fresh forward pass over the whole sequence.

  Rows are right-padded to a fixed width (segment 0, which nothing sees) so one compilation
  serves every step.
  """
  tokens = np.zeros((len(sequences), width), np.int32)
  segments = np.zeros_like(tokens)
  for row, seq in enumerate(sequences):
    tokens[row, :len(seq)], segments[row, :len(seq)] = seq, 1
  logits = _jit_forward(cfg)(params, tokens_BL=tokens, segment_ids_BL=segments)
  return np.stack([logits[row, len(seq) - 1] for row, seq in enumerate(sequences)])


CACHE_CASES = {
    "gpt2-scanned": GPT2,
    "gpt2-unscanned": dataclasses.replace(GPT2, scan_layers=False),
    "gpt2-window": dataclasses.replace(GPT2, sliding_window=4),
    "llama-gqa-scanned": LLAMA,
    "llama-gqa-window-unscanned": dataclasses.replace(LLAMA, sliding_window=3, scan_layers=False),
    "llama-mqa-window": dataclasses.replace(LLAMA, num_kv_heads=1, sliding_window=5),
}


@pytest.mark.parametrize("cfg", CACHE_CASES.values(), ids=CACHE_CASES.keys())
def test_cached_decoding_equals_recomputing_every_step(cfg):
  """Prefill + one cached step per token gives the logits of recomputing the whole sequence."""
  params = params_in_layout(cfg)
  prompt_BP, start_B, cache_len, _ = decode.prepare(PROMPTS, 6, cfg, ())
  step = jax.jit(functools.partial(decode.extend, params, cfg))
  cache = decode.init_cache(params, cfg, jnp.asarray(start_B), cache_len)
  assert jax.tree.leaves(cache.kv)[0].shape[-4:] == (3, cfg.num_kv_heads, cache_len, cfg.dim_per_head)
  logits_BV, cache = step(cache, prompt_BP)
  sequences = [list(p) for p in PROMPTS]
  for _ in range(6):
    expected_BV = recomputed_logits(params, cfg, sequences)
    np.testing.assert_allclose(logits_BV, expected_BV, atol=1e-4, rtol=1e-4)
    tokens_B = np.asarray(strategies.greedy(logits_BV))
    np.testing.assert_array_equal(tokens_B, expected_BV.argmax(-1))
    for seq, token in zip(sequences, tokens_B):
      seq.append(int(token))
    logits_BV, cache = step(cache, tokens_B[:, None])
  if cfg.sliding_window:  # the window must matter here, or this case tests nothing new
    full = dataclasses.replace(cfg, sliding_window=0)
    assert np.abs(recomputed_logits(params, full, sequences) - recomputed_logits(params, cfg, sequences)).max() > 1e-2


@pytest.mark.parametrize("cfg", [GPT2, CACHE_CASES["llama-gqa-window-unscanned"]], ids=["gpt2", "llama-window"])
def test_generate_greedy_matches_recomputation(cfg):
  """The jitted loop's tokens are argmax of recomputed logits; its log-probs are their log_softmax."""
  params = params_in_layout(cfg)
  completions = sampling.generate(params, cfg, PROMPTS, max_new_tokens=7)
  for prompt, c in zip(PROMPTS, completions):
    assert len(c.tokens) == 7 and c.finish_reason == "length"
    sequence = list(prompt)
    for token, log_prob in zip(c.tokens, c.log_probs):
      logits_V = recomputed_logits(params, cfg, [sequence])[0]
      assert token == logits_V.argmax()
      np.testing.assert_allclose(log_prob, jax.nn.log_softmax(logits_V)[token], atol=1e-4)
      sequence.append(token)
    assert c.score == pytest.approx(sum(c.log_probs), abs=1e-4)


def test_row_output_is_the_same_alone_and_in_a_batch():
  """Left padding, other rows and the bucket size change nothing, for greedy and for sampling."""
  params = params_for(GPT2)
  batch = [PROMPTS[0], [3] * 11, PROMPTS[1]]  # a longer and a shorter prompt beside row 0
  together = sampling.generate(params, GPT2, batch, max_new_tokens=6)
  for prompt, c in zip(batch, together):
    alone = sampling.generate(params, GPT2, [prompt], max_new_tokens=6)[0]
    assert alone.tokens == c.tokens
    np.testing.assert_allclose(alone.log_probs, c.log_probs, atol=1e-5)
  kw = dict(max_new_tokens=6, temperature=1.0, top_k=50, seed=11)
  sampled = sampling.generate(params, GPT2, batch, **kw)[0]
  assert sampling.generate(params, GPT2, batch[:1], **kw)[0].tokens == sampled.tokens
  assert sampling.generate(params, GPT2, batch, **kw)[0].tokens == sampled.tokens  # reproducible
  other_seeds = [sampling.generate(params, GPT2, batch, **{**kw, "seed": s})[0].tokens for s in (1, 2)]
  assert any(tokens != sampled.tokens for tokens in other_seeds)


def test_one_compilation_per_length_bucket():
  params = params_for(GPT2)
  sampling.generate(params, GPT2, [[4, 5, 6, 7, 8]], max_new_tokens=6)
  before = decode.sample_loop._cache_size()
  sampling.generate(params, GPT2, [[9, 9, 9, 9, 9, 9, 9]], max_new_tokens=7)  # prompt bucket 8, cache 16
  sampling.generate(params, GPT2, [[1, 2, 3]], max_new_tokens=3, seed=5)
  assert decode.sample_loop._cache_size() == before
  assert decode.bucket(5) == 8 and decode.bucket(9) == 16 and decode.bucket(64) == 64


def random_logits(shape, seed=0, scale=3.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


def test_top_k_never_leaves_the_k_most_likely():
  logits_BV = random_logits((64, 50))
  top5_BV = np.argsort(-np.asarray(logits_BV), axis=-1)[:, :5]
  assert (np.isfinite(strategies.top_k_filter(logits_BV, 5)).sum(-1) == 5).all()
  sampler = strategies.Sampler(temperature=2.0, top_k=5)
  draws = np.stack([sampler(logits_BV, jax.random.key(i)) for i in range(200)], axis=1)  # [64, 200]
  assert all(set(row) <= set(top) for row, top in zip(draws, top5_BV))
  assert all(len(set(row)) == 5 for row in draws)  # a high temperature visits all five
  assert (strategies.Sampler(temperature=5.0, top_k=1)(logits_BV, jax.random.key(0)) == logits_BV.argmax(-1)).all()


def test_top_p_keeps_to_the_nucleus():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits_BV = jnp.log(jnp.asarray(np.tile(probs, (4000, 1)), jnp.float32))
  for p, nucleus in ((0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
    kept = set(np.flatnonzero(np.isfinite(strategies.top_p_filter(logits_BV[:1], p)[0])))
    assert kept == nucleus, p
  draws = np.asarray(strategies.Sampler(temperature=1.0, top_p=0.75)(logits_BV, jax.random.key(1)))
  assert set(draws) == {0, 1}
  # Renormalized inside the nucleus: 0.5 / 0.8 = 0.625; 4000 draws put 5 sigma at 0.038.
  assert abs((draws == 0).mean() - 0.625) < 0.038
  # With top-k first, top-p renormalizes over the k survivors: of 0.5 and 0.3, p=0.6 keeps only 0.
  assert set(np.asarray(strategies.Sampler(1.0, top_k=2, top_p=0.6)(logits_BV, jax.random.key(2)))) == {0}


def test_temperature_zero_equals_greedy():
  logits_BV = random_logits((32, 40), seed=3)
  greedy_B = logits_BV.argmax(-1)
  key = jax.random.key(4)
  assert (strategies.Sampler(0.0, top_k=3, top_p=0.5)(logits_BV, key) == greedy_B).all()
  assert (strategies.Sampler(1e-3)(logits_BV, key) == greedy_B).all()  # and it is the limit T -> 0
  params = params_for(LLAMA)
  greedy = sampling.generate(params, LLAMA, PROMPTS, max_new_tokens=5)
  zero = sampling.generate(params, LLAMA, PROMPTS, max_new_tokens=5, temperature=0.0, top_k=7, top_p=0.3, seed=9)
  assert [c.tokens for c in zero] == [c.tokens for c in greedy]


def test_temperature_sampling_follows_softmax_of_scaled_logits():
  """Pearson's chi-square over 20000 draws from 6 tokens at T = 0.7.

  With the right distribution the statistic is chi-square with 5 degrees of freedom, which
  exceeds 20.5 with probability 0.001; the seed is fixed, so this is a deterministic check that
  a correct sampler fails for one seed in a thousand. Ignoring T would give a statistic in the
  thousands (checked below, so the test has the power to see that bug).
  """
  logits_V = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
  draws = 20000
  sampler = strategies.Sampler(temperature=0.7)
  tokens = np.asarray(sampler(jnp.tile(logits_V, (draws, 1)), jax.random.key(0)))
  counts = np.bincount(tokens, minlength=6)

  def chi_square(probs):
    expected = draws * np.asarray(probs)
    return float(((counts - expected) ** 2 / expected).sum())

  assert chi_square(jax.nn.softmax(logits_V / 0.7)) < 20.5
  assert chi_square(jax.nn.softmax(logits_V)) > 1000


def enumerate_best(params, cfg, prompt, vocab, max_new, eos, length_penalty):
  """The best-scoring continuation by brute force: every sequence that ends at eos or at max_new."""
  candidates = []
  for n in range(1, max_new + 1):
    for seq in itertools.product(range(vocab), repeat=n):
      if eos in seq[:-1] or (n < max_new and seq[-1] != eos):
        continue
      candidates.append(list(seq))
  full = [list(prompt) + c for c in candidates]
  width = max(len(f) for f in full)
  tokens = np.array([f + [0] * (width - len(f)) for f in full], np.int32)
  segments = np.array([[1] * len(f) + [0] * (width - len(f)) for f in full], np.int32)
  log_probs = jax.nn.log_softmax(transformer.forward(params, cfg, tokens, segment_ids_BL=segments), axis=-1)
  scores = []
  for row, seq in enumerate(candidates):
    total = sum(float(log_probs[row, len(prompt) - 1 + i, t]) for i, t in enumerate(seq))
    scores.append(total / len(seq) ** length_penalty)
  best = int(np.argmax(scores))
  return candidates[best], scores[best]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_best_sequence_when_it_can_see_them_all(length_penalty):
  """Vocab 4, eos 2, three new tokens: 16 beams hold every live prefix, so beam search is exact."""
  cfg = dataclasses.replace(GPT2, vocab_size=4, init_std=0.5)
  params = params_for(cfg)
  prompts = [[1, 3, 0, 3], [0, 1]]
  results = sampling.generate(params, cfg, prompts, max_new_tokens=3, num_beams=16, eos_id=2,
                              length_penalty=length_penalty)
  for prompt, result in zip(prompts, results):
    best, score = enumerate_best(params, cfg, prompt, 4, 3, 2, length_penalty)
    assert result.tokens == best
    assert result.score == pytest.approx(score, abs=1e-4)
    assert result.finish_reason == ("eos" if best[-1] == 2 else "length")
    np.testing.assert_allclose(sum(result.log_probs) / len(best) ** length_penalty, score, atol=1e-4)


def reference_beam_search(params, cfg, prompt, beams, max_new, eos, length_penalty):
  """Beam search written plainly: a forward pass over every alive prefix at every step, no early stop.

  Candidates are the 2W best expansions; one ending in eos joins the finished hypotheses if it
  ranks among the first W, the others fill the W alive beams; at max_new the alive beams finish.
  """
  alive, finished = [([], 0.0)], []
  for _ in range(max_new):
    log_probs = jax.nn.log_softmax(recomputed_logits(params, cfg, [prompt + t for t, _ in alive]), axis=-1)
    expansions = [(total + float(log_probs[i, v]), tokens + [v])
                  for i, (tokens, total) in enumerate(alive) for v in range(cfg.vocab_size)]
    alive = []
    for rank, (total, tokens) in enumerate(sorted(expansions, key=lambda e: -e[0])[:2 * beams]):
      if tokens[-1] == eos:
        if rank < beams:
          finished.append((total / len(tokens) ** length_penalty, tokens))
      elif len(alive) < beams:
        alive.append((tokens, total))
  finished += [(total / max_new ** length_penalty, tokens) for tokens, total in alive]
  return max(finished)


@pytest.mark.parametrize("length_penalty", [0.0, 2.0])
def test_beam_search_with_early_stopping_equals_running_to_the_end(length_penalty):
  """Vocab 8 with eos among the likely tokens: hypotheses finish early and the loop stops early."""
  cfg = dataclasses.replace(GPT2, vocab_size=8, init_std=0.5)
  params, prompts = params_for(cfg), [[3, 5, 1], [6]]
  results = sampling.generate(params, cfg, prompts, max_new_tokens=9, num_beams=3, eos_id=2,
                              length_penalty=length_penalty)
  for prompt, result in zip(prompts, results):
    score, tokens = reference_beam_search(params, cfg, prompt, 3, 9, 2, length_penalty)
    assert result.tokens == tokens
    assert result.score == pytest.approx(score, abs=1e-4)


def test_one_beam_without_length_penalty_is_greedy():
  params = params_for(LLAMA)
  path = sampling.generate(params, LLAMA, PROMPTS[:1], max_new_tokens=8)[0].tokens
  # eos: the runner-up at step 3 (it must be passed over, as greedy passes it over), or the argmax
  # at step 5 (it must end the row there)
  runner_up = int(np.argsort(recomputed_logits(params, LLAMA, [PROMPTS[0] + path[:3]])[0])[-2])
  for eos in (runner_up, path[5]):
    greedy = sampling.generate(params, LLAMA, PROMPTS, max_new_tokens=8, eos_id=eos)
    for (tokens, score), c in zip(decode_beam(params, LLAMA, PROMPTS, 8, eos, beams=1, length_penalty=0.0), greedy):
      assert tokens == c.tokens
      assert score == pytest.approx(c.score, abs=1e-4)
  assert greedy[0].tokens[-1] == path[5] and greedy[0].finish_reason == "eos"


def decode_beam(params, cfg, prompts, max_new, eos, *, beams, length_penalty):
  """beam_search_loop directly: generate() sends num_beams=1 to the sampler, not to beam search."""
  prompt_BP, start_B, cache_len, stop_MW = decode.prepare(prompts, max_new, cfg, ())
  tokens_BT, log_probs_BT, length_B, _, score_B = jax.device_get(sampling.beam.beam_search_loop(
      params, prompt_BP, start_B, np.int32(max_new), np.int32(eos), stop_MW, np.float32(length_penalty), cfg=cfg,
      num_beams=beams, cache_len=cache_len))
  return [(tokens_BT[b, :n].tolist(), float(score_B[b])) for b, n in enumerate(length_B)]


def test_eos_and_stop_sequences_stop_each_row():
  params = params_for(GPT2)
  free = sampling.generate(params, GPT2, PROMPTS[:2], max_new_tokens=10)
  a, b = (c.tokens for c in free)
  eos = a[3]
  stopped = sampling.generate(params, GPT2, PROMPTS[:2], max_new_tokens=10, eos_id=eos)
  cut = a.index(eos) + 1
  assert stopped[0].tokens == a[:cut] and stopped[0].finish_reason == "eos"
  np.testing.assert_allclose(stopped[0].log_probs, free[0].log_probs[:cut], atol=1e-5)
  expected_b = b[:b.index(eos) + 1] if eos in b else b
  assert stopped[1].tokens == expected_b and stopped[1].finish_reason == ("eos" if eos in b else "length")

  stop = b[4:6]  # a two-token stop sequence from row 1's free run; another that never occurs
  stopped = sampling.generate(params, GPT2, PROMPTS[:2], max_new_tokens=10, stop=[[255, 254, 253], stop])
  end = next(i + 2 for i in range(len(b) - 1) if b[i:i + 2] == stop)
  assert stopped[1].tokens == b[:end] and stopped[1].finish_reason == "stop"
  a_end = next((i + 2 for i in range(len(a) - 1) if a[i:i + 2] == stop), None)
  assert stopped[0].tokens == (a[:a_end] if a_end else a)
  # Beam hypotheses end at a stop sequence too, and never run past one.
  beam_kw = dict(max_new_tokens=10, num_beams=3)
  stop = sampling.generate(params, GPT2, PROMPTS[:2], **beam_kw)[0].tokens[4:6]
  beams = sampling.generate(params, GPT2, PROMPTS[:2], **beam_kw, stop=[stop])
  assert "stop" in [c.finish_reason for c in beams]
  for c in beams:
    ends = [i + 2 for i in range(len(c.tokens) - 1) if c.tokens[i:i + 2] == stop]
    assert ends == ([len(c.tokens)] if c.finish_reason == "stop" else [])


def test_generate_text_details_and_stop_strings():
  tok = tokenizer.ByteTokenizer()
  cfg = dataclasses.replace(GPT2, vocab_size=tok.vocab_size)
  params = params_for(cfg)
  prompts = ["ab", "hello"]
  free = sampling.generate_text(params, cfg, tok, prompts, max_new_tokens=12, return_details=True)
  for prompt, d in zip(prompts, free):
    assert d["prompt"] == prompt and d["prompt_token_ids"] == tok.encode(prompt)
    assert len(d["token_ids"]) == len(d["log_probs"])
    assert all(lp <= 0 for lp in d["log_probs"])
    body = d["token_ids"][:-1] if d["finish_reason"] == "eos" else d["token_ids"]
    assert d["text"] == tok.decode(body)
  text = free[1]["text"]
  stop = tok.decode(free[1]["token_ids"][5:7])
  assert stop and stop in text
  cut = sampling.generate_text(params, cfg, tok, prompts, max_new_tokens=12, stop=[stop], return_details=True)[1]
  assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
  assert cut["token_ids"] == free[1]["token_ids"][:len(cut["token_ids"])]
  assert stop in tok.decode(cut["token_ids"]) and stop not in tok.decode(cut["token_ids"][:-1])
  assert sampling.generate_text(params, cfg, tok, prompts, max_new_tokens=12) == [d["text"] for d in free]


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_sharded_greedy_equals_single_device(cfg):
  assert jax.device_count() == 8
  params = params_for(cfg)
  prompts = PROMPTS + [[11, 12, 13]]
  single = sampling.generate(params, cfg, prompts, max_new_tokens=6)
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  shardings = sharding.param_shardings(mesh, transformer.logical_axes(cfg), transformer.abstract_params(cfg))
  sharded = jax.device_put(params, shardings)
  assert not sharded["layers"]["self_attn"]["k_proj"]["kernel"].sharding.is_fully_replicated
  with jax.set_mesh(mesh):
    out = sampling.generate(sharded, cfg, prompts, max_new_tokens=6)
  assert [c.tokens for c in out] == [c.tokens for c in single]
  for a, b in zip(out, single):
    np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-4)
  # Without an explicit mesh the sampler enters the parameters' own.
  assert [c.tokens for c in sampling.generate(sharded, cfg, prompts, max_new_tokens=6)] == [c.tokens for c in single]


def test_bad_requests_raise_user_errors():
  params = params_for(GPT2)
  with pytest.raises(UserError, match="max_len"):
    sampling.generate(params, GPT2, [[1] * 60], max_new_tokens=5)
  with pytest.raises(UserError, match="deterministic"):
    sampling.generate(params, GPT2, [[1]], max_new_tokens=5, num_beams=2, temperature=0.5)
  with pytest.raises(UserError, match="empty prompt"):
    sampling.generate(params, GPT2, [[1], []], max_new_tokens=5)
  with pytest.raises(UserError, match="top_p"):
    strategies.Sampler(1.0, top_p=0.0)
  assert math.isclose(strategies.scale_by_temperature(jnp.array([[2.0]]), 0.5)[0, 0], 4.0)
