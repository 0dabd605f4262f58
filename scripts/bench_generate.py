"""Greedy generation speed of the gpt-10m preset, and of Hugging Face transformers on the same weights.

    .venv/bin/python scripts/bench_generate.py [--repeats 3]

Prints one JSON line. Workload: random-init gpt-10m, prompts of 64 random tokens, exactly 192
new tokens (no eos), greedy, batch 1 and batch 8, float32.

- `tokens_per_s_b1`, `tokens_per_s_b8`: new tokens per second, batch x 192 / wall time of one
  `sampling.generate` call (host-side preparation and the copy back included).
- `ttft_ms_b1`, `ttft_ms_b8`: time to first token, the wall time of a call asking for one new
  token (prefill plus one sampling step); the same definition for transformers.
- These headline figures use the parameters unstacked (`layout: unrolled`, via
  `transformer.unstack_layers`), the layout to sample with on CPU; `detail.scanned` has the
  preset's stacked layout too, whose `lax.scan` slices every layer's weights and cache out of
  the stacks at every token.

With transformers and torch importable, the same run builds `GPT2LMHeadModel` from
`interop.hf.config_to_hf`, loads our weights through `interop.hf.to_hf_state_dict`, and times
`generate(do_sample=False, use_cache=True, min_new_tokens=192, max_new_tokens=192)` with torch's
default thread count and with one thread (`detail.hf_threadsN`). `hf_*` figures and the
`ratio_b1`, `ratio_b8` (ours / theirs) take the faster of the two, because torch's spinning
threads collapse when other processes share the cores. `agree_prefix_min` is the shortest
common prefix of our greedy tokens and transformers' over all rows (near-ties of a random
model may legitimately part them late; a wrong model would part them at once).

Every figure is the best of `--repeats` timed calls after a warm-up (compilation excluded),
all contenders interleaved so they see the same machine load; `load_avg_1m` records it.

Speculative decoding needs a draft that agrees with its target, so it is measured on trained
models instead (that run prints only its own JSON line):

    .venv/bin/python scripts/bench_generate.py --workdir runs/wiki10m --draft-workdir runs/wikidraft \
        --speculate 4 --text ../shared/data/wikitext-2/raw/wiki.test.raw

Prompts are 8 windows of 64 tokens of `--text`; 128 new tokens, greedy and sampled (temperature
0.8), batch 1 (one prompt per call, as a chat user waits) and batch 8. `acceptance_rate` is
accepted / proposed draft tokens, `speedup` the target alone's wall time over speculative's for
the same prompts, and `same_tokens` says greedy speculative gave the target's own tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import time

import jax
import numpy as np

from llm_jax import sampling
from llm_jax.model import presets, transformer

try:  # the `hf` extra
  import torch
  import transformers
except ImportError:
  torch = transformers = None

PROMPT_LEN, NEW_TOKENS, BATCHES = 64, 192, (1, 8)


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def ours(params, cfg, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
  return [c.tokens for c in sampling.generate(params, cfg, prompts, max_new_tokens=new_tokens)]


def hf_model(params, cfg):
  """transformers' GPT-2 holding exactly our weights, or None without transformers/torch."""
  if transformers is None:
    return None
  from llm_jax.interop import hf
  transformers.logging.set_verbosity_error()
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf.config_to_hf(cfg)))
  state = {name: torch.from_numpy(np.array(t)) for name, t in hf.to_hf_state_dict(params, cfg).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and all(name == "lm_head.weight" for name in missing), (missing, unexpected)
  model.tie_weights()
  return model.eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, threads: int = 0) -> list[list[int]]:
  """transformers' greedy continuation; `threads` > 0 sets torch's intra-op threads first."""
  if threads:
    torch.set_num_threads(threads)
  ids = torch.tensor(prompts)
  with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1, use_cache=True,
                         min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
  return out[:, ids.shape[1]:].tolist()


def bench_speculative(args) -> None:
  import pathlib
  import llm_jax
  from llm_jax.sampling import speculative
  target, draft = llm_jax.load(args.workdir), llm_jax.load(args.draft_workdir)
  text = pathlib.Path(args.text).read_text(encoding="utf-8").replace("\r\n", "\n")
  ids = target.tokenizer.encode(text)
  prompts = [ids[i * 4096:i * 4096 + 64] for i in range(8)]
  cfg, eos = target.config.model, target.tokenizer.eos_id
  result = {"workdir": args.workdir, "draft_workdir": args.draft_workdir, "speculate": args.speculate,
            "target_params": sum(x.size for x in jax.tree.leaves(target.params)),
            "draft_params": sum(x.size for x in jax.tree.leaves(draft.params)), "new_tokens": 128}
  for mode, temperature in (("greedy", 0.0), ("sampled", 0.8)):
    for batch in (1, 8):
      groups = [prompts[i:i + batch] for i in range(0, 8, batch)]
      plain = lambda: [sampling.generate(target.params, cfg, g, max_new_tokens=128, temperature=temperature,  # noqa: E731
                                         eos_id=eos) for g in groups]
      fast = lambda: [speculative.generate(target.params, cfg, draft.params, draft.config.model, g,  # noqa: E731
                                           max_new_tokens=128, num_draft=args.speculate, temperature=temperature,
                                           eos_id=eos) for g in groups]
      plain_out, fast_out = plain(), fast()  # compile
      times = {"plain": [], "fast": []}
      for _ in range(args.repeats):
        times["plain"].append(timed(plain))
        times["fast"].append(timed(fast))
      key = f"{mode}_b{batch}"
      tokens = sum(len(c.tokens) for out in plain_out for c in out)
      result[f"{key}_target_tokens_per_s"] = round(tokens / min(times["plain"]), 1)
      result[f"{key}_speculative_tokens_per_s"] = round(
          sum(len(c.tokens) for out in fast_out for c in out.completions) / min(times["fast"]), 1)
      result[f"{key}_speedup"] = round(min(times["plain"]) / min(times["fast"]), 3)
      result[f"{key}_acceptance_rate"] = round(float(np.mean([out.acceptance_rate for out in fast_out])), 3)
      if mode == "greedy":
        result[f"{key}_same_tokens"] = [c.tokens for out in plain_out for c in out] == [
            c.tokens for out in fast_out for c in out.completions]
  lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
  result["cpu"] = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")
  result["load_avg_1m"] = round(os.getloadavg()[0], 2)
  print(json.dumps(result))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workdir", help="with --draft-workdir: the trained target of the speculative benchmark")
  parser.add_argument("--draft-workdir", help="a trained draft: measure speculative decoding instead")
  parser.add_argument("--speculate", type=int, default=4)
  parser.add_argument("--text", help="the text the speculative benchmark's prompts come from")
  args = parser.parse_args()
  if args.draft_workdir:
    bench_speculative(args)
    return

  cfg = presets.get("gpt-10m")
  scanned = transformer.init_params(cfg, jax.random.key(0))
  layouts = {"scanned": scanned, "unrolled": transformer.unstack_layers(scanned)}
  model = hf_model(scanned, cfg)
  default_threads = torch.get_num_threads() if model is not None else 0
  rng = np.random.RandomState(0)
  prompts = {b: rng.randint(3, cfg.vocab_size, (b, PROMPT_LEN)).tolist() for b in BATCHES}

  result = {"model": "gpt-10m", "backend": jax.default_backend(), "cpus": os.cpu_count(), "prompt_len": PROMPT_LEN,
            "new_tokens": NEW_TOKENS, "layout": "unrolled"}
  detail: dict[str, dict[str, float]] = {}
  agree = []
  for b in BATCHES:
    for new in (NEW_TOKENS, 1):  # warm-up: compile every length bucket before timing
      for params in layouts.values():
        ours(params, cfg, prompts[b], new)
      if model is not None:
        hf_generate(model, prompts[b], new)
    if model is not None:
      mine, theirs = ours(layouts["unrolled"], cfg, prompts[b], NEW_TOKENS), hf_generate(model, prompts[b], NEW_TOKENS)
      assert all(len(t) == NEW_TOKENS for t in mine + theirs)
      agree += [next((i for i, (x, y) in enumerate(zip(a, h)) if x != y), NEW_TOKENS) for a, h in zip(mine, theirs)]
    contenders = {name: functools.partial(ours, params, cfg) for name, params in layouts.items()}
    if model is not None:
      contenders.update({f"hf_threads{t}": functools.partial(hf_generate, model, threads=t)
                         for t in sorted({default_threads, 1})})
    seconds: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so every contender sees the same machine load
      for name, run in contenders.items():
        seconds.setdefault(f"{name} gen", []).append(timed(lambda: run(prompts[b], NEW_TOKENS)))
        seconds.setdefault(f"{name} ttft", []).append(timed(lambda: run(prompts[b], 1)))
    for name in contenders:
      detail.setdefault(name, {})[f"tokens_per_s_b{b}"] = round(b * NEW_TOKENS / min(seconds[f"{name} gen"]), 1)
      detail[name][f"ttft_ms_b{b}"] = round(1000 * min(seconds[f"{name} ttft"]), 2)
    result[f"tokens_per_s_b{b}"] = detail["unrolled"][f"tokens_per_s_b{b}"]
    result[f"ttft_ms_b{b}"] = detail["unrolled"][f"ttft_ms_b{b}"]
    if model is not None:
      hf_names = [name for name in contenders if name.startswith("hf")]
      best = max(hf_names, key=lambda name: detail[name][f"tokens_per_s_b{b}"])
      result[f"hf_tokens_per_s_b{b}"] = detail[best][f"tokens_per_s_b{b}"]
      result[f"hf_ttft_ms_b{b}"] = min(detail[name][f"ttft_ms_b{b}"] for name in hf_names)
      result[f"ratio_b{b}"] = round(result[f"tokens_per_s_b{b}"] / result[f"hf_tokens_per_s_b{b}"], 2)
  if model is not None:
    result["agree_prefix_min"] = min(agree)
  result["detail"] = detail
  result["load_avg_1m"] = round(os.getloadavg()[0], 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
