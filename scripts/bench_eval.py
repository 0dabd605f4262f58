"""PIQA validation through the scoring engine against (a) one request at a time and (b) lm-eval's `hf` backend.

  flock -x /work/cpu.lock python scripts/bench_eval.py --workdir runs/bench_eval

(a) is `Model.log_likelihood` as it was before the engine (a faithful copy below: one jitted
forward pass per request, compiled again for every new length), on the first --baseline-questions
questions, against the engine on those same questions; (b) is lm-eval's `HFLM` on the same weights
converted with `llm-jax convert --to-hf`, against our lm-eval adapter (`llm-jax`), both called
through lm-eval's `loglikelihood` on the same requests with the same batch size. Every timing
starts from an empty compilation cache (jax.clear_caches), so the engine pays its compilations
too; the warm figure is printed beside. Accuracies (acc, acc_norm) must agree. One JSON line.

The workdir must hold a model with llm-jax's byte tokenizer: the hf side gets the very same ids from
a byte-level tokenizer built here (checked request by request). The one measured in
docs/benchmarks.md, trained here for it:

  llm-jax train --config configs/tiny_shakespeare.py --workdir runs/bench_eval model.max_len=2048
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class OldHandle:
  """`Model.logits` and `Model.log_likelihood` as llm_jax/handle.py had them before the engine (7535ee0)."""

  def __init__(self, params, config):
    import jax
    from llm_jax.model import transformer
    self.params = params
    self._forward = jax.jit(functools.partial(transformer.forward, cfg=config.model))

  def logits(self, token_ids):
    import jax.numpy as jnp
    import numpy as np
    tokens = jnp.asarray(np.asarray(token_ids, dtype=np.int32))
    return np.asarray(self._forward(self.params, tokens_BL=tokens))

  def log_likelihood(self, context, continuation):
    import jax
    import numpy as np
    tokens = list(context) + list(continuation)
    logits = self.logits([tokens[:-1]])[0, len(context) - 1:]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target = np.asarray(continuation)
    total = float(np.asarray(log_probs)[np.arange(len(target)), target].sum())
    return total, bool((np.argmax(logits, axis=-1) == target).all())


def byte_tokenizer_for_transformers():
  """A transformers tokenizer giving llm-jax's byte ids (byte b -> b + 4; pad, bos, eos, unk = 0..3)."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  extra = iter(range(256, 512))
  char_of = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}  # byte-level BPE's alphabet
  specials = ["<pad>", "<s>", "</s>", "<unk>"]
  vocab = {**{s: i for i, s in enumerate(specials)}, **{char_of[b]: b + 4 for b in range(256)}}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(specials)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>")


def accuracy(lls, questions):
  import numpy as np
  hits = hits_norm = 0
  for q, question in enumerate(questions):
    pair = np.array(lls[2 * q:2 * q + 2])
    hits += int(np.argmax(pair)) == question.gold
    hits_norm += int(np.argmax(pair / [len(c) for c in question.choices])) == question.gold
  return hits / len(questions), hits_norm / len(questions)


def timed(fn):
  import jax
  jax.clear_caches()
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--baseline-questions", type=int, default=100, help="(a) runs on this many first questions")
  parser.add_argument("--limit", type=int, help="the first N questions only (a quick check; the figures use all)")
  parser.add_argument("--piqa", default=str(REPO.parent / "shared/data/eval/piqa"))
  parser.add_argument("--cpu-devices", type=int,
                      help="XLA devices of this CPU host (default: the run's mesh.cpu_devices)")
  args = parser.parse_args()

  from llm_jax import checkpoint, distributed, sharding
  from llm_jax.config import MeshConfig
  cpu_devices = args.cpu_devices
  if cpu_devices is None:  # the run's own, as `llm-jax eval` does
    cpu_devices = checkpoint.find_params(args.workdir)[1].mesh.cpu_devices
  distributed.set_cpu_devices(cpu_devices)
  import jax
  import torch
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM

  import llm_jax
  from llm_jax.data import tokenizer as tok_lib
  from llm_jax.eval import choice, harness, scoring, tasks
  from llm_jax.model import stats

  model = llm_jax.load(args.workdir)
  assert isinstance(model.tokenizer, tok_lib.ByteTokenizer), "the benchmark needs a model with the byte tokenizer"
  questions = tasks.piqa_questions(pathlib.Path(args.piqa))[:args.limit]
  requests = [choice.encode_pair(model.tokenizer, q.context, " " + c) for q in questions for c in q.choices]
  assert all(len(c) + len(x) <= model.config.model.max_len + 1 for c, x in requests), "raise model.max_len"
  mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
  answer = functools.partial(choice.answer, model, batch_size=args.batch_size, mesh=mesh)

  # (a) The first questions one request at a time through the old path, and through the engine.
  few = questions[:args.baseline_questions]
  old = OldHandle(model.params, model.config)
  old_lls, old_s = timed(lambda: [old.log_likelihood(c, x)[0] for c, x in requests[:2 * len(few)]])
  few_figures, few_s = timed(lambda: answer(few))
  assert accuracy(old_lls, few) == (few_figures["acc"], few_figures["acc_norm"])

  # The whole validation split through the engine, cold then warm.
  figures, engine_s = timed(lambda: answer(questions))
  start = time.perf_counter()
  answer(questions)
  warm_s = time.perf_counter() - start

  # (b) lm-eval's hf backend against our adapter, through lm-eval's loglikelihood, same requests and batch size.
  instances = [Instance("loglikelihood", {}, (q.context, " " + c), i)
               for i, (q, c) in enumerate((q, c) for q in questions for c in q.choices)]
  hf_tokenizer = byte_tokenizer_for_transformers()
  for instance, (context_ids, continuation_ids) in zip(instances, requests):
    assert hf_tokenizer.encode("".join(instance.args), add_special_tokens=False) == [*context_ids, *continuation_ids]
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "llm_jax", "convert", "--to-hf", args.workdir, "--out", f"{tmp}/hf"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    theirs = HFLM(pretrained=f"{tmp}/hf", tokenizer=hf_tokenizer, batch_size=args.batch_size, device="cpu",
                  dtype="float32")
    start = time.perf_counter()
    hf_lls = [ll for ll, _ in theirs.loglikelihood(instances, disable_tqdm=True)]
    hf_s = time.perf_counter() - start
  ours = harness.LlmJaxLM(path=args.workdir, batch_size=args.batch_size)
  adapter_lls, adapter_s = timed(lambda: [ll for ll, _ in ours.loglikelihood(instances, disable_tqdm=True)])
  n, cpu = len(requests), subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True)
  print(json.dumps({
      "benchmark": "eval_piqa", "cpu": cpu.stdout.split(":", 1)[-1].strip(), "workdir": args.workdir,
      "params": stats.count_params(model.config.model)["params"], "max_len": model.config.model.max_len,
      "jax_devices": jax.device_count(), "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
      "pack_len": scoring.PACK_LEN,
      "questions": len(questions), "requests": n, "acc": figures["acc"], "acc_norm": figures["acc_norm"],
      "engine": {"seconds": round(engine_s, 2), "requests_per_s": round(n / engine_s, 1),
                 "warm_seconds": round(warm_s, 2), "warm_requests_per_s": round(n / warm_s, 1)},
      "one_by_one": {"requests": 2 * len(few), "seconds": round(old_s, 2), "requests_per_s": round(2 * len(few) / old_s, 2),
                     "engine_seconds": round(few_s, 2), "engine_requests_per_s": round(2 * len(few) / few_s, 1)},
      "hf": {"seconds": round(hf_s, 2), "requests_per_s": round(n / hf_s, 1), "acc": accuracy(hf_lls, questions)},
      "adapter": {"seconds": round(adapter_s, 2), "requests_per_s": round(n / adapter_s, 1),
                  "acc": accuracy(adapter_lls, questions),
                  "max_abs_ll_difference_vs_hf": max(abs(a - b) for a, b in zip(adapter_lls, hf_lls))},
      "speedup_vs_one_by_one": round(old_s / few_s, 1), "speedup_vs_hf": round(hf_s / adapter_s, 2),
  }))


if __name__ == "__main__":
  main()
