"""`llm-jax generate` and `llm-jax convert --to-hf` on a real trained workdir, through the real command.

One tiny GPT-2 is trained once for the module (60 steps on Tiny Shakespeare's bytes, enough for beam
search and greedy decoding to part ways); every test reads that workdir through a subprocess.
"""

import importlib
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train_loop import tiny_run_args, train  # tests/test_train_loop.py

import llm_jax

pytestmark = pytest.mark.slow  # trains a run, then calls the real command
DETAIL_KEYS = {"prompt", "text", "prompt_token_ids", "token_ids", "log_probs", "finish_reason", "score"}


@pytest.fixture(scope="module")
def workdir(shared_data, tmp_path_factory):
  run = tmp_path_factory.mktemp("generate") / "run"
  result = train(tiny_run_args(shared_data, run, "train.steps=60", "train.eval_every=0", "train.log_every=20",
                               "optim.learning_rate=1e-2"))
  assert result.returncode == 0, result.stderr[-3000:]
  return run


@pytest.fixture(scope="module")
def model(workdir):
  return llm_jax.load(workdir)


def generate(workdir, *args) -> list[dict]:
  result = subprocess.run([sys.executable, "-m", "llm_jax", "generate", "--workdir", str(workdir), "--json", *args],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines()]


def test_json_output_is_the_models_own_tokens_and_log_probs(workdir, model):
  """Keys, ids that decode to the text, and log-probs equal to log_softmax of the model's logits (greedy: the
  argmax at every step), recomputed here from one full forward pass without the KV cache."""
  (result,) = generate(workdir, "--prompt", "ROMEO:", "--max-new-tokens", "12")
  assert result.keys() == DETAIL_KEYS
  assert result["prompt"] == "ROMEO:" and result["prompt_token_ids"] == model.tokenizer.encode("ROMEO:")
  ids, log_probs = result["token_ids"], result["log_probs"]
  assert len(ids) == len(log_probs) and 1 <= len(ids) <= 12
  body = ids[:-1] if result["finish_reason"] == "eos" else ids
  assert model.tokenizer.decode(body) == result["text"]
  assert all(math.isfinite(p) and p <= 0 for p in log_probs)
  prompt = result["prompt_token_ids"]
  sequence = prompt + ids
  logits = model.logits([sequence[:-1]])[0, len(prompt) - 1:]
  reference = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  np.testing.assert_allclose(log_probs, reference[np.arange(len(ids)), ids], atol=1e-4)
  assert ids == np.argmax(logits, axis=-1).tolist()
  assert result["score"] == pytest.approx(sum(log_probs), rel=1e-5)


def test_prompts_file_gives_one_result_per_nonblank_line_in_order(workdir, model, tmp_path):
  prompts = ["ROMEO:", "KING", "First Citizen:"]
  (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n   \n{prompts[2]}\n")
  results = generate(workdir, "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "8")
  assert [r["prompt"] for r in results] == prompts
  expected = model.generate(prompts, max_new_tokens=8, return_details=True)
  assert [r["token_ids"] for r in results] == [e["token_ids"] for e in expected]
  assert [r["text"] for r in results] == [e["text"] for e in expected]


def test_num_beams_equals_the_python_api(workdir, model):
  (beam,) = generate(workdir, "--prompt", "ROMEO:", "--max-new-tokens", "16", "--num-beams", "3")
  expected = model.generate(["ROMEO:"], max_new_tokens=16, num_beams=3, return_details=True)[0]
  assert beam["token_ids"] == expected["token_ids"] and beam["text"] == expected["text"]
  assert beam["score"] == pytest.approx(expected["score"], rel=1e-6)
  greedy = model.generate(["ROMEO:"], max_new_tokens=16, return_details=True)[0]
  assert beam["token_ids"] != greedy["token_ids"]  # the flag reached the search: greedy decodes other tokens


def hf_extra(name: str):
  """A module of the hf extra: skipped without it in a user's clone, a failure in CI (as in test_hf.py)."""
  if os.environ.get("CI") == "true":
    return importlib.import_module(name)
  return pytest.importorskip(name, reason=f"the hf extra ({name}) is needed to compare with transformers")


def test_training_workdir_exports_to_transformers_with_the_same_logits(workdir, model, tmp_path):
  torch = hf_extra("torch")
  transformers = hf_extra("transformers")
  out = tmp_path / "hf"
  result = subprocess.run([sys.executable, "-m", "llm_jax", "convert", "--to-hf", str(workdir), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                                      output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  tokens = np.random.default_rng(0).integers(0, 260, (2, 40)).astype(np.int32)
  with torch.no_grad():
    theirs = hf_model.eval()(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  ours = model.logits(tokens)
  assert theirs.shape == ours.shape == (2, 40, model.config.model.vocab_size)
  assert np.abs(ours - theirs).max() < 1e-4  # test_hf.py's TOL
