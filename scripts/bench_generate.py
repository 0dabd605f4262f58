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
"""

from __future__ import annotations

import argparse
import functools
import json
import os
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

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
