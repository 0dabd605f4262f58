"""Speculative decoding keeps the target's output: greedy token for token, sampling in distribution.

The distribution test samples many rows of one prompt on a vocabulary of 8, where every two-token
continuation's exact probability under the target is computable, and applies a chi-square bound.
The same bound, at the same sample size, rejects two plausible wrong acceptance rules (so it can
fail): resampling from the target instead of the residual, and keeping every draft token.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from llm_jax import sampling
from llm_jax.errors import UserError
from llm_jax.model import presets, transformer
from llm_jax.sampling import speculative
from llm_jax.sampling.strategies import Sampler

TARGET = dataclasses.replace(presets.get("tiny-gpt2"), init_std=0.2, scan_layers=False)
DRAFT = dataclasses.replace(presets.get("tiny-llama"), num_layers=1, init_std=0.2, scan_layers=False)
SMALL_VOCAB = 8
SAMPLES = 6000


def params(cfg, seed):
  return transformer.init_params(cfg, jax.random.key(seed))


def test_greedy_speculative_equals_greedy_target():
  """12 prompts of lengths 1 to 12, with eos and a stop sequence in play, J = 3, against a draft that is
  the target's first layer alone (often rejected, sometimes accepted) and the target itself (always accepted)."""
  target = params(TARGET, 0)
  draft_cfg = dataclasses.replace(TARGET, num_layers=1)
  draft = {**target, "layers": {"0": target["layers"]["0"]}}
  rng = np.random.RandomState(0)
  prompts = [rng.randint(3, 256, size=n).tolist() for n in range(1, 13)]
  plain = sampling.generate(target, TARGET, prompts, max_new_tokens=20, eos_id=5)
  stop = [plain[0].tokens[3:5]]  # occurs in row 0's output: that row must end there
  plain = sampling.generate(target, TARGET, prompts, max_new_tokens=20, eos_id=5, stop=stop)
  assert plain[0].finish_reason == "stop"
  fast = speculative.generate(target, TARGET, draft, draft_cfg, prompts, max_new_tokens=20, num_draft=3, eos_id=5,
                              stop=stop)
  assert [c.tokens for c in fast.completions] == [c.tokens for c in plain]
  assert [c.finish_reason for c in fast.completions] == [c.finish_reason for c in plain]
  for a, b in zip(fast.completions, plain):
    np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-4)
  assert 0 < fast.acceptance_rate < 0.9  # both branches of the rule ran
  itself = speculative.generate(target, TARGET, target, TARGET, prompts, max_new_tokens=20, num_draft=3, eos_id=5)
  assert itself.acceptance_rate == 1.0
  assert [c.tokens for c in itself.completions] == [c.tokens for c in sampling.generate(
      target, TARGET, prompts, max_new_tokens=20, eos_id=5)]


def chi_square_ok(samples: np.ndarray, probs: np.ndarray) -> bool:
  """Whether sample counts fit `probs` (cells with an expected count under 5 pooled) at significance 1e-4."""
  counts = np.bincount(samples, minlength=probs.size).astype(float)
  expected = probs * samples.size
  small = expected < 5
  counts = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  keep = expected > 0
  statistic = float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))
  return statistic < stats.chi2.ppf(1 - 1e-4, keep.sum() - 1)


@pytest.fixture(scope="module")
def small():
  """A target and a draft over 8 tokens whose next-token distributions differ clearly, and the prompt."""
  target_cfg = dataclasses.replace(TARGET, vocab_size=SMALL_VOCAB, init_std=0.1)
  draft_cfg = dataclasses.replace(DRAFT, vocab_size=SMALL_VOCAB, init_std=0.1)
  return target_cfg, params(target_cfg, 2), draft_cfg, params(draft_cfg, 3), [1, 4, 6]


def next_probs(cfg, p, rows, sampler):
  """The sampler's distribution of the token after each of `rows` (token lists of one length), one forward pass."""
  logits = transformer.forward(p, cfg, jnp.asarray(rows))[:, -1]
  return np.asarray(speculative.probabilities(logits, sampler)).astype(np.float64)


@pytest.mark.parametrize("sampler", [Sampler(1.0), Sampler(0.8, top_p=0.9)], ids=["t1", "t0.8-top_p0.9"])
def test_sampled_pairs_follow_the_target_distribution(small, sampler):
  """Two tokens per row from 6000 rows: the frequency of each of the 64 pairs matches the target's own
  probability of it (its sampler's filtered distribution), by chi-square."""
  target_cfg, target, draft_cfg, draft, prompt = small
  [first] = next_probs(target_cfg, target, [prompt], sampler)
  assert 0.5 * np.abs(first - next_probs(draft_cfg, draft, [prompt], sampler)[0]).sum() > 0.15  # the draft is wrong often
  second = next_probs(target_cfg, target, [prompt + [a] for a in range(SMALL_VOCAB)], sampler)
  joint = (first[:, None] * second).reshape(-1)  # pair (a, b) at a * SMALL_VOCAB + b
  result = speculative.generate(target, target_cfg, draft, draft_cfg, [prompt] * SAMPLES, max_new_tokens=2,
                                num_draft=2, temperature=sampler.temperature, top_p=sampler.top_p, seed=0)
  pairs = np.array([c.tokens[0] * SMALL_VOCAB + c.tokens[1] for c in result.completions])
  assert 0.2 < result.acceptance_rate < 0.95
  assert chi_square_ok(pairs, joint / joint.sum())


def _resample_from_target(p_J1V, q_JV, draft_J, u_J, key):
  accepted, _ = speculative.verify(p_J1V, q_JV, draft_J, u_J, key)
  return accepted, jax.random.categorical(key, jnp.log(p_J1V[accepted])).astype(jnp.int32)


def _keep_every_draft(p_J1V, q_JV, draft_J, u_J, key):
  return jnp.int32(draft_J.shape[0]), jax.random.categorical(key, jnp.log(p_J1V[-1])).astype(jnp.int32)


def test_the_bound_rejects_wrong_acceptance_rules(small):
  """One position, 6000 draws: the first token after a round follows the target with `verify`, and not with the
  wrong rules, under the same chi-square bound as the loop's test."""
  target_cfg, target, draft_cfg, draft, prompt = small
  sampler = Sampler(1.0)
  [p_V], [q_V] = next_probs(target_cfg, target, [prompt], sampler), next_probs(draft_cfg, draft, [prompt], sampler)
  p_J1V = jnp.asarray(np.stack([p_V, p_V]), jnp.float32)  # J = 1; the bonus row's contents do not matter here
  q_JV = jnp.asarray(q_V[None], jnp.float32)

  def first_tokens(rule):
    def one(key):
      k_draft, k_u, k_rule = jax.random.split(key, 3)
      draft_J = jax.random.categorical(k_draft, jnp.log(q_JV))
      accepted, token = rule(p_J1V, q_JV, draft_J, jax.random.uniform(k_u, (1,)), k_rule)
      return jnp.where(accepted > 0, draft_J[0], token)
    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(5), SAMPLES)))

  assert chi_square_ok(first_tokens(speculative.verify), p_V)
  assert not chi_square_ok(first_tokens(_resample_from_target), p_V)
  assert not chi_square_ok(first_tokens(_keep_every_draft), p_V)


def test_bad_settings_are_refused():
  target = params(TARGET, 0)
  other = dataclasses.replace(DRAFT, vocab_size=128)
  with pytest.raises(UserError, match="the draft model's vocabulary has 128 tokens but the target's has 256"):
    speculative.generate(target, TARGET, params(other, 1), other, [[3]], max_new_tokens=2, num_draft=2)
  with pytest.raises(UserError, match="--speculate 0: expected at least 1"):
    speculative.generate(target, TARGET, target, TARGET, [[3]], max_new_tokens=2, num_draft=0)


def test_generate_command_with_a_draft_prints_the_targets_greedy_output(tmp_path, capsys):
  """`llm-jax generate --draft-workdir DIR --speculate K` through the command's own function."""
  from llm_jax import checkpoint, cli
  from llm_jax import config as config_lib
  from llm_jax.data import tokenizer as tokenizer_lib
  cfg = dataclasses.replace(TARGET, vocab_size=tokenizer_lib.BYTE_VOCAB_SIZE)
  target = params(cfg, 4)
  draft_cfg = dataclasses.replace(cfg, num_layers=1)
  for name, p, c in (("target", target, cfg), ("draft", {**target, "layers": {"0": target["layers"]["0"]}}, draft_cfg)):
    checkpoint.save_params(tmp_path / name, p, config_lib.Config(model=c))
    tokenizer_lib.ByteTokenizer().save(tmp_path / name)
  args = ["generate", "--workdir", str(tmp_path / "target"), "--prompt", "abc", "--max-new-tokens", "10", "--json"]
  assert cli.main(args) == 0
  plain = json.loads(capsys.readouterr().out)
  assert cli.main([*args, "--draft-workdir", str(tmp_path / "draft"), "--speculate", "3"]) == 0
  assert json.loads(capsys.readouterr().out)["token_ids"] == plain["token_ids"]
  assert cli.main([*args, "--speculate", "3"]) == 2
  assert "--speculate sets the draft model's tokens per round; add --draft-workdir DIR" in capsys.readouterr().err
