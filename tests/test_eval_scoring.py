"""The scoring engine against one-request-at-a-time forward passes, unpadded and unbatched.

Models use init_std 0.2 so their next-token distributions are peaked: a log-probability taken
at the wrong position, or a padded token leaking into a row, moves the figures far past 1e-5.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from llm_jax import sharding
from llm_jax.config import MeshConfig
from llm_jax.eval import scoring
from llm_jax.model import presets, transformer

LLAMA = dataclasses.replace(presets.get("tiny-llama"), init_std=0.2, max_len=32)  # rope, GQA
GPT2 = dataclasses.replace(presets.get("tiny-gpt2"), init_std=0.2, max_len=32)  # learned positions


@functools.lru_cache(maxsize=None)
def params_for(cfg):
  return transformer.init_params(cfg, jax.random.key(0))


_forward = jax.jit(transformer.forward, static_argnames="cfg")


def log_softmax(params, cfg, tokens_BL):
  """log p over the vocabulary at every position of equal-length rows of real tokens (no padding)."""
  return np.asarray(jax.nn.log_softmax(_forward(params, cfg=cfg, tokens_BL=np.asarray(tokens_BL, np.int32)), axis=-1))


def direct(params, cfg, context, continuation):
  """log p(continuation | context) and greedy, from one forward pass over the request's own tokens."""
  tokens = (list(context) + list(continuation))[-(cfg.max_len + 1):]
  log_p = log_softmax(params, cfg, [tokens[:-1]])[0]
  positions = range(len(tokens) - 1 - len(continuation), len(tokens) - 1)
  return (float(sum(log_p[t, tokens[t + 1]] for t in positions)),
          all(np.argmax(log_p[t]) == tokens[t + 1] for t in positions))


def random_requests(count, vocab, seed=0, lengths=(9, 20, 40)):
  """Requests of 9, 20 or 40 tokens in all (40 is cut to max_len + 1 = 33), split anywhere into context and
  continuation; few distinct lengths keep the one-by-one reference down to three compilations."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    tokens = rng.integers(4, vocab, rng.choice(lengths)).tolist()
    split = int(rng.integers(max(1, len(tokens) - 32), len(tokens)))
    out.append((tokens[:split], tokens[split:]))
  return out


@pytest.mark.parametrize("cfg, pack_len", [(LLAMA, 32), (GPT2, 32), (LLAMA, 24), (LLAMA, 0)],
                         ids=["rope-packed", "learned-positions-packed", "packed-and-alone", "alone"])
def test_packed_bucketed_batched_scoring_equals_one_by_one(cfg, pack_len):
  """Packed rows (positions restart in each request: rope and learned positions), rows of one request
  padded to a bucket, and both in one call."""
  params = params_for(cfg)
  requests = random_requests(14, cfg.vocab_size)
  context = requests[0][0][:8]  # the model's own first choice after a context is greedy
  requests.append((context, [int(np.argmax(log_softmax(params, cfg, [context])[0, -1]))]))
  assert any(scoring.needs_truncation(r, cfg.max_len) for r in requests)  # left truncation is exercised
  rows = [scoring._row(c, x, cfg.max_len, i, True) for i, (c, x) in enumerate(requests)]
  groups = scoring._pack_requests(rows, pack_len, scoring.buckets(cfg.max_len))
  shared, alone = any(len(g) > 1 for g, _ in groups), any(n > pack_len for _, n in groups)
  assert (shared, alone) == (pack_len > 0, pack_len < 32)  # each case is what its id says
  results = scoring.score(params, cfg, requests, batch_size=4, pack_len=pack_len)
  assert_one_by_one(params, cfg, requests, results)
  assert results[-1][1] is True


def test_short_requests_fill_the_rest_of_long_rows_and_long_rows_batch_by_tokens():
  """Requests of 19 input tokens open rows of their bucket (24) whose rest takes requests of 4; with
  pack_len 16 and batch_size 4 a batch holds 64 tokens, so those rows go two at a time."""
  params = params_for(LLAMA)
  requests = random_requests(14, LLAMA.vocab_size, seed=3, lengths=(5, 20))
  rows = [scoring._row(c, x, LLAMA.max_len, i, True) for i, (c, x) in enumerate(requests)]
  groups = scoring._pack_requests(rows, 16, scoring.buckets(LLAMA.max_len))
  assert any(n == 24 and len(g) > 1 for g, n in groups) and sum(n == 24 for _, n in groups) > 2
  assert_one_by_one(params, LLAMA, requests, scoring.score(params, LLAMA, requests, batch_size=4, pack_len=16))


def assert_one_by_one(params, cfg, requests, results):
  for request, (total, greedy) in zip(requests, results, strict=True):
    expected, expected_greedy = direct(params, cfg, *request)
    np.testing.assert_allclose(total, expected, atol=1e-5, rtol=1e-5)
    assert greedy == expected_greedy


def test_the_same_requests_in_any_order_give_the_same_figures_bit_for_bit():
  params = params_for(LLAMA)
  requests = random_requests(12, LLAMA.vocab_size, seed=1)
  forward = scoring.score(params, LLAMA, requests, batch_size=4)
  backward = scoring.score(params, LLAMA, requests[::-1], batch_size=4)[::-1]
  assert forward == backward


def test_buckets_grow_geometrically_and_end_at_max_len():
  assert scoring.buckets(256) == [16, 24, 32, 48, 64, 96, 128, 192, 256]
  assert scoring.buckets(100) == [16, 24, 32, 48, 64, 96, 100]
  assert scoring.buckets(16) == [16] and scoring.buckets(8) == [8]


def test_sharded_over_eight_devices_equals_one_device():
  params = params_for(LLAMA)
  requests = random_requests(19, LLAMA.vocab_size, seed=2, lengths=(5, 9, 14))  # one bucket: three compilations
  mesh = sharding.make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
  assert scoring.batch_shards(mesh) == 8
  one = scoring.score(params, LLAMA, requests, batch_size=8)
  eight = scoring.score(params, LLAMA, requests, batch_size=8, mesh=mesh)
  np.testing.assert_allclose([x for x, _ in eight], [x for x, _ in one], atol=1e-5, rtol=1e-5)
  assert [g for _, g in eight] == [g for _, g in one]
  fsdp = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # batch over 4 shards, replicated over tensor
  np.testing.assert_allclose([x for x, _ in scoring.score(params, LLAMA, requests, batch_size=3, mesh=fsdp)],
                             [x for x, _ in one], atol=1e-5, rtol=1e-5)


def direct_rolling(params, cfg, tokens):
  """Every token after the first predicted from all the tokens before it, at most max_len of them: the first
  max_len from one pass over the document's start (causal attention), each later one from its own row."""
  L = cfg.max_len
  start = log_softmax(params, cfg, [tokens[:L]])[0]
  total = sum(float(start[t - 1, tokens[t]]) for t in range(1, min(L + 1, len(tokens))))
  later = range(L + 1, len(tokens))
  if later:
    rows = log_softmax(params, cfg, [tokens[t - L:t] for t in later])
    total += sum(float(rows[i, -1, tokens[t]]) for i, t in enumerate(later))
  return total


def test_rolling_equals_summed_token_log_probs_computed_directly():
  params = params_for(GPT2)
  rng = np.random.default_rng(3)
  short, long = rng.integers(4, 256, 20).tolist(), rng.integers(4, 256, 75).tolist()
  # Overlap max_len - 1: each window after the first predicts one token from the max_len tokens before it.
  rolled = scoring.rolling(params, GPT2, [short, long], prefix_id=None, overlap=GPT2.max_len - 1, batch_size=8)
  np.testing.assert_allclose(rolled, [direct_rolling(params, GPT2, short), direct_rolling(params, GPT2, long)],
                             atol=1e-4, rtol=1e-5)
  # A document within the context is one window whatever the overlap; with a prefix its first token counts too.
  with_prefix = scoring.rolling(params, GPT2, [short], prefix_id=1, overlap=0)
  np.testing.assert_allclose(with_prefix, [direct_rolling(params, GPT2, [1] + short)], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("overlap", [0, 5, 31])
def test_rolling_windows_predict_every_token_once_within_the_context(overlap):
  tokens = list(range(100, 175))
  for prefix in (None, 1):
    windows = scoring.rolling_windows(tokens, 32, overlap, prefix)
    predicted = [t for _, continuation in windows for t in continuation]
    assert predicted == (tokens if prefix is not None else tokens[1:])
    assert scoring.predicted_tokens(tokens, prefix) == len(predicted)
    for context, continuation in windows:
      assert len(context) + len(continuation) <= 33 and context
    # Every window but the first and the last sees exactly overlap + 1 tokens before its own.
    assert all(len(context) == overlap + 1 for context, _ in windows[1:-1])
    assert len(windows[-1][0]) + len(windows[-1][1]) == 33  # the last window is filled with context


def test_requests_the_engine_cannot_score_fail_in_one_line():
  params = params_for(LLAMA)
  cases = [
      ([([], [5])], "request 0 has an empty context; condition on a prefix token"),
      ([([5], [6]), ([5], [])], "request 1 has an empty continuation"),
      ([([5], list(range(4, 37)))], "continuation of 33 tokens does not fit the model's context of model.max_len=32"),
  ]
  for requests, message in cases:
    with pytest.raises(scoring.ScoringError, match=message) as e:
      scoring.score(params, LLAMA, requests)
    assert "\n" not in str(e.value)
  with pytest.raises(scoring.ScoringError) as e:
    scoring.score(params, LLAMA, [(list(range(4, 35)), [5, 6, 7])], truncate=False)
  assert str(e.value) == ("request 0: its context of 31 tokens and continuation of 3 are longer than the model's "
                          "context of model.max_len=32 + 1 tokens; shorten the context to at most 30 tokens, or pass "
                          "truncate=True to keep its last tokens as lm-eval does")
  with pytest.raises(scoring.ScoringError, match="overlap=32: expected 0 <= overlap < model.max_len=32"):
    scoring.rolling_windows([5, 6], 32, overlap=32)
  assert scoring.score(params, LLAMA, []) == []
