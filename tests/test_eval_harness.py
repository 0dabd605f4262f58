"""The lm-eval-harness adapter against lm-eval's own `hf` backend, our local tasks and our sampler.

Nothing downloads: the models are tiny and random, built here; PIQA is the shared local copy, read
by the repo's own task YAML (harness_tasks/piqa_local.yaml).
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets and transformers read it
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hf_extra import hf_extra  # noqa: E402  (tests/hf_extra.py)

lm_eval = hf_extra("lm_eval")
torch = hf_extra("torch")
transformers = hf_extra("transformers")

import llm_jax  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402
from llm_jax import checkpoint  # noqa: E402
from llm_jax import config as config_lib  # noqa: E402
from llm_jax.data import tokenizer as tok_lib  # noqa: E402
from llm_jax.eval import harness, runner, scoring, tasks  # noqa: E402
from llm_jax.interop import hf  # noqa: E402
from llm_jax.model import presets, transformer  # noqa: E402
from test_hf_tokenizer import FLAVOURS  # noqa: E402  (a byte-level BPE that prepends its bos, as Llama 3's does)

LIMIT = 6  # PIQA questions


def local_tasks() -> TaskManager:
  return TaskManager(include_path=str(harness.TASKS_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
  """A random GPT-2 (peaked: init_std 0.2) with llm-jax's byte tokenizer, as a parameters-only export."""
  model = dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=260, max_len=512, init_std=0.2)
  folder = tmp_path_factory.mktemp("byte_model")
  checkpoint.save_params(folder, transformer.init_params(model, jax.random.key(1)), config_lib.Config(model=model))
  tok_lib.ByteTokenizer().save(folder)
  return folder


def evaluate(model: str, model_args: str, **kwargs):
  return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["piqa_local"], limit=LIMIT,
                                 batch_size=4, task_manager=local_tasks(), **kwargs)


def test_our_piqa_task_and_the_harness_give_the_same_accuracy_exactly(byte_model):
  [ours] = runner.run(byte_model, ["piqa"], limit=LIMIT, batch_size=4)
  results = evaluate("llm-jax", f"path={byte_model}")["results"]["piqa_local"]
  assert (results["acc,none"], results["acc_norm,none"]) == (ours["figures"]["acc"], ours["figures"]["acc_norm"])


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """A tiny random transformers Llama with a byte-level BPE tokenizer, and its conversion to llm-jax."""
  hf_dir = tmp_path_factory.mktemp("hf_llama")
  config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    bos_token_id=0, eos_token_id=1, pad_token_id=None)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(hf_dir)
  FLAVOURS["byte_level"](hf_dir)
  return hf_dir, pathlib.Path(hf.import_hf(hf_dir, tmp_path_factory.mktemp("converted") / "work"))


def test_hf_backend_and_ours_give_the_same_log_likelihoods_and_accuracy(hf_pair):
  hf_dir, converted = hf_pair
  theirs = evaluate("hf", f"pretrained={hf_dir},dtype=float32,device=cpu", log_samples=True)
  ours = evaluate("llm-jax", f"path={converted}", log_samples=True)
  lls = {}  # each choice's (log-likelihood, is_greedy), of each question in order
  for name, out in (("hf", theirs), ("ours", ours)):
    lls[name] = [float(resp[0][0]) for sample in out["samples"]["piqa_local"] for resp in sample["resps"]]
  assert len(lls["ours"]) == 2 * LIMIT
  np.testing.assert_allclose(lls["ours"], lls["hf"], atol=1e-4, rtol=1e-5)
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"]["piqa_local"][metric] == theirs["results"]["piqa_local"][metric]


def test_rolling_log_likelihood_matches_the_hf_backend(hf_pair):
  """Texts longer than the 256-token context: lm-eval's rolling windows, scored by both backends."""
  hf_dir, converted = hf_pair
  texts = [(tasks.data_root(config_lib.EvalConfig()) / "tiny_shakespeare/input.txt").read_text()[:1500],
           "The quick brown fox jumps over the lazy dog."]
  requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
  theirs = HFLM(pretrained=str(hf_dir), batch_size=4, device="cpu", dtype="float32").loglikelihood_rolling(requests)
  ours = harness.LlmJaxLM(path=str(converted), batch_size=4).loglikelihood_rolling(requests)
  assert len(harness.LlmJaxLM(path=str(converted)).tok_encode(texts[0])) > 256  # several windows
  np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-5)


def test_rolling_windows_are_lm_evals():
  for length, overlap, prefix in [(1, 0, 7), (10, 0, 7), (75, 0, 7), (75, 5, 7), (64, 31, 7), (75, 0, None)]:
    tokens = list(range(100, 100 + length))
    expected = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        tokens if prefix is not None else tokens[1:], prefix if prefix is not None else tokens[0], 32, overlap + 1)]
    assert scoring.rolling_windows(tokens, 32, overlap, prefix) == [(list(c), list(x)) for c, x in expected]


def test_wikitext_detokenizer_is_lm_evals(shared_data):
  from lm_eval.tasks.wikitext import preprocess_wikitext
  articles = tasks.wikitext_articles((shared_data / "wikitext-2/raw/wiki.test.raw").read_bytes().decode())
  for article in articles:
    assert tasks.wikitext_detokenize(article) == preprocess_wikitext.wikitext_detokenizer({"page": article})


def test_generate_until_equals_our_greedy_generation_cut_at_the_stop_string(byte_model):
  lm = harness.LlmJaxLM(path=str(byte_model), batch_size=2)
  model = llm_jax.load(byte_model)
  prompts = ["ROMEO: ", "Question: how do I boil an egg?\nAnswer:", "x" * 600]  # the last is cut from the left
  free = model.generate(prompts[:2], raw=True, max_new_tokens=16)
  assert len(free[0]) > 6
  stop = free[0][4]  # a character greedy decoding writes a few steps in
  requests = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 16, "do_sample": False}), i)
              for i, p in enumerate(prompts)]
  outputs = lm.generate_until(requests)
  expected = model.generate(prompts[:2], raw=True, max_new_tokens=16, stop=[stop])
  assert outputs[:2] == expected and len(outputs[0]) < len(free[0]) and stop not in outputs[0]
  assert outputs[2] == model.generate(["x" * (512 - 16)], raw=True, max_new_tokens=16, stop=[stop])[0]


def test_cli_runs_lm_evals_own_command_with_our_model(byte_model):
  result = subprocess.run([sys.executable, "-m", "llm_jax", "eval", "--workdir", str(byte_model), "--harness",
                           "piqa_local", "--limit", "4", "--batch-size", "4"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "CI": "true"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "piqa_local" in result.stdout and "acc_norm" in result.stdout  # lm-eval's own table
  [written] = list((byte_model / "eval" / "harness").rglob("results_*.json"))
  figures = json.loads(written.read_text())["results"]["piqa_local"]
  [ours] = runner.run(byte_model, ["piqa"], limit=4, batch_size=4)
  assert figures["acc,none"] == ours["figures"]["acc"]
  bad = subprocess.run([sys.executable, "-m", "llm_jax", "eval", "--workdir", str(byte_model), "--harness", "",
                        ], capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.startswith("llm-jax: error: --harness is empty")
