"""`llm-jax eval`'s local tasks on real models and the shared data, against figures computed here directly."""

import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax.data import tokenizer as tok_lib
from llm_jax.eval import runner, tasks
from llm_jax.errors import UserError
from llm_jax.eval.tasks import EvalError
from llm_jax.model import heads, presets, transformer
from llm_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=4", "model.d_ff=256",
        "data.seq_len=64", "model.max_len=512", "train.batch_size=16", "optim.warmup_steps=5",
        "optim.learning_rate=3e-3", "train.steps=30", "train.eval_every=0", "train.log_every=10",
        "sample.max_new_tokens=8", "mesh.cpu_devices=0"]


@pytest.fixture(scope="module")
def workdir(shared_data, tmp_path_factory):
  """A small GPT-2 trained 30 steps on Tiny Shakespeare's bytes (max_len 512: PIQA's first questions fit)."""
  path = tmp_path_factory.mktemp("eval") / "run"
  config = config_lib.override(config_lib.load_file(REPO / "tests/gpt2_bytes_config.py"), [
      f"data.source=text:{shared_data / 'tiny_shakespeare/input.txt'}", "data.text_split=blank_line", *TINY])
  loop.train(config, path)
  return path


def export(folder, model, params=None, tokenizer=True):
  """A parameters-only checkpoint of `model` (random weights unless given), with the byte tokenizer beside it."""
  params = transformer.init_params(model, jax.random.key(0)) if params is None else params
  checkpoint.save_params(folder, params, config_lib.Config(model=model))
  if tokenizer:
    tok_lib.ByteTokenizer().save(folder)
  return folder, params


def cli(*args):
  return subprocess.run([sys.executable, "-m", "llm_jax", "eval", *args], capture_output=True, text=True,
                        timeout=600, env={**os.environ, "CI": "true"})


FORWARD = jax.jit(transformer.forward, static_argnums=1)  # a reference compiled once a length, not run op by op


def row_log_likelihood(params, model, context, continuation):
  """log p(continuation | context) from one forward pass over the request's own bytes."""
  tokens = [b + 4 for b in (context + continuation).encode()]
  n = len(continuation.encode())
  log_p = np.asarray(jax.nn.log_softmax(FORWARD(params, model, jnp.asarray([tokens[:-1]])), axis=-1))[0]
  return float(sum(log_p[t - 1, tokens[t]] for t in range(len(tokens) - n, len(tokens))))


def articles_by_hand(raw: bytes, count: int) -> list[str]:
  text = raw.decode().replace("\r\n", "\n")
  starts = [m.start() for m in re.finditer(r"(?m)^ = [^=][^\n]* = $", text)] + [len(text)]
  return [text[a:b] for a, b in zip(starts, starts[1:])][:count]


def test_cli_on_a_trained_workdir_prints_the_table_and_writes_the_json(workdir, shared_data, tmp_path):
  text_file = tmp_path / "shakespeare_head.txt"  # 20 KB: the whole 1.1 MB file took most of this test's time
  text_file.write_bytes((shared_data / "tiny_shakespeare/input.txt").read_bytes()[:20_000])
  result = cli("--workdir", str(workdir), "--tasks", f"wikitext2,piqa,sst2,text:{text_file}", "--limit", "2",
               "--batch-size", "8")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0] == f"model: {workdir / 'checkpoints' / '30'} (step 30)"
  assert re.match(r"task +metric +value$", lines[1]) and set(lines[2]) == {"-", " "}
  assert re.search(r"^wikitext2 +word_perplexity +[\d,.]+$", result.stdout, re.M)
  assert re.search(r"^piqa +acc +0\.\d{4}$", result.stdout, re.M)
  records = {}
  for name, file in [("wikitext2", "wikitext2"), ("piqa", "piqa"), ("sst2", "sst2"),
                     (f"text:{text_file}", runner.file_name(f"text:{text_file}"))]:
    path = workdir / "eval" / f"{file}.json"
    assert f"wrote {path} (" in result.stdout
    records[name] = json.loads(path.read_text())
    assert records[name]["task"] == name and records[name]["model_step"] == 30 and records[name]["limit"] == 2
    assert records[name]["batch_size"] == 8 and records[name]["seconds"] > 0
    assert records[name]["config"]["model"]["max_len"] == 512
  assert records["piqa"]["data"]["questions"] == str(shared_data / "eval/piqa/valid.jsonl")

  # WikiText-2: two articles, words and bytes counted in the originals, every byte but the first predicted.
  wiki = records["wikitext2"]["figures"]
  originals = articles_by_hand((shared_data / "wikitext-2/raw/wiki.test.raw").read_bytes(), 2)
  assert originals[0].startswith(" = Robert Boulter = \n") and wiki["documents"] == 2
  assert wiki["words"] == sum(len(re.split(r"\s+", a)) for a in originals)
  assert wiki["bytes"] == sum(len(a.encode()) for a in originals)
  assert wiki["tokens"] == sum(len(tasks.wikitext_detokenize(a).encode()) - 1 for a in originals)
  ll = wiki["log_likelihood"]
  assert wiki["word_perplexity"] == pytest.approx(math.exp(-ll / wiki["words"]))
  assert wiki["bits_per_byte"] == pytest.approx(-ll / wiki["bytes"] / math.log(2))
  assert wiki["byte_perplexity"] == pytest.approx(2 ** wiki["bits_per_byte"])
  assert 1 < wiki["token_perplexity"] < 260

  # PIQA: accuracy from each choice's bytes scored alone, one unpadded forward pass per request.
  import llm_jax
  model = llm_jax.load(workdir)
  rows = tasks.piqa_rows(shared_data / "eval/piqa")[:2]
  hits = hits_norm = 0
  for row in rows:
    lls = [row_log_likelihood(model.params, model.config.model, f"Question: {row['goal']}\nAnswer:", f" {s}")
           for s in (row["sol1"], row["sol2"])]
    hits += int(np.argmax(lls)) == row["label"]
    hits_norm += int(np.argmax(np.array(lls) / [len(row["sol1"]), len(row["sol2"])])) == row["label"]
  assert records["piqa"]["figures"]["acc"] == hits / 2 and records["piqa"]["figures"]["acc_norm"] == hits_norm / 2
  assert records["sst2"]["figures"]["zero_shot"] == 1 and records["sst2"]["figures"]["questions"] == 2
  text = records[f"text:{text_file}"]["figures"]
  assert text["documents"] == 1 and text["bytes"] == text_file.stat().st_size


def test_wikitext_articles_and_detokenizer(shared_data):
  raw = shared_data / "wikitext-2/raw/wiki.test.raw"  # the eval section's default, under ../shared/data
  assert tasks.data_root(config_lib.EvalConfig()) == shared_data
  articles = tasks.wikitext_articles(raw.read_bytes().decode())
  assert len(articles) == 62 and all(a.startswith(" = ") and "\r" not in a for a in articles)
  assert "".join(articles) == raw.read_bytes().decode().replace("\r\n", "\n")
  assert tasks.wikitext_detokenize(" = = Career = = \n a 1 @,@ 000 @-@ year ( it 's ) \" odd \" , fine . \n") == (
      " == Career ==\na 1,000-year (it's) \"odd\", fine.\n")


def test_uniform_logits_give_a_perplexity_equal_to_the_vocabulary_size(tmp_path):
  """Zero embeddings tied to the output head: every logit is 0, every token has probability 1/512."""
  model = dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=512, max_len=32)
  params = transformer.init_params(model, jax.random.key(0))
  params["embed_tokens"]["embedding"] = jnp.zeros_like(params["embed_tokens"]["embedding"])
  folder, _ = export(tmp_path / "uniform", model, params)
  (tmp_path / "a.txt").write_text("To be, or not to be, that is the question:\n" * 3)
  (tmp_path / "b.txt").write_text("naïve café\n")
  [record] = runner.run(folder, [f"text:{tmp_path}/*.txt"], batch_size=4)
  figures = record["figures"]
  assert figures["token_perplexity"] == pytest.approx(512, rel=1e-5)
  assert figures["tokens"] == figures["bytes"] - 2  # bytes as tokens; each file's first one is context only
  assert figures["bits_per_byte"] == pytest.approx(math.log2(512) * figures["tokens"] / figures["bytes"], rel=1e-5)


def test_sst2_accuracy_of_a_classifier_equals_each_sentence_classified_alone(shared_data, tmp_path):
  model = dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=260, max_len=64, num_classes=2, init_std=0.2)
  folder, params = export(tmp_path / "classifier", model)
  [record] = runner.run(folder, ["sst2"], limit=12, batch_size=5)
  rows = (shared_data / "sst2/test.tsv").read_text().splitlines()[1:13]
  classify = jax.jit(lambda p, tokens: heads.classify(p, model, transformer.hidden(p, model, tokens)))
  hits = 0
  for row in rows:
    sentence, label = row.rsplit("\t", 1)
    ids = [b + 4 for b in sentence.strip().encode()][-63:] + [tok_lib.EOS_ID]  # the eos ends every example
    hits += int(np.argmax(classify(params, jnp.asarray([ids]))[0, -1])) == int(label)
  assert record["figures"]["zero_shot"] == 0 and record["figures"]["examples"] == 12
  assert record["figures"]["acc"] == hits / 12


def one_line(excinfo) -> str:
  assert "\n" not in str(excinfo.value), str(excinfo.value)
  return str(excinfo.value)


def test_bad_input_fails_in_one_line_before_loading(shared_data, tmp_path):
  short = dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=260, max_len=16)
  folder, _ = export(tmp_path / "short", short)
  bare, _ = export(tmp_path / "bare", short, tokenizer=False)
  cases = [
      (folder, ["hellaswag"], [], "unknown task 'hellaswag'; choose from wikitext2, piqa, sst2, text:GLOB"),
      (folder, ["text:"], [], "task 'text:' has no pattern; write text:GLOB"),
      (folder, [f"text:{tmp_path}/none/*.txt"], [], "the pattern matches no file"),
      (folder, ["piqa"], [f"eval.piqa={tmp_path}/nowhere"],
       f"{tmp_path}/nowhere not found: a folder with PIQA's valid.jsonl and valid-labels.lst; set eval.piqa=PATH"),
      (folder, ["wikitext2"], [f"eval.data_dir={tmp_path}"], "set eval.wikitext2=PATH, or eval.data_dir=DIR"),
      (folder, ["wikitext2"], ["eval.overlapp=1"], "unknown config key 'eval.overlapp'; did you mean eval.overlap"),
      (bare, ["wikitext2"], [], f"{bare} has no tokenizer beside its checkpoint (tokenizer.json or tokenizer.model)"),
      (folder, ["piqa"], [], "question 1: a choice of 165 tokens does not fit the model's context of model.max_len=16 "
                             "tokens, so it cannot be scored"),
  ]
  for path, names, overrides, message in cases:
    with pytest.raises(UserError) as e:
      runner.run(path, names, limit=1, overrides=overrides)
    assert message in one_line(e), (names, overrides)
  with pytest.raises(EvalError, match="--limit 0: expected at least 1"):
    runner.run(folder, ["wikitext2"], limit=0)
  # Through the command: one line on stderr, exit status 2, nothing written.
  result = cli("--workdir", str(folder), "--tasks", "wikitext2,hellaswag")
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      "llm-jax: error: unknown task 'hellaswag'; choose from wikitext2, piqa, sst2, text:GLOB (e.g. --tasks "
      "wikitext2,piqa or --tasks 'text:docs/*.txt')"]
  assert not (folder / "eval").exists()
