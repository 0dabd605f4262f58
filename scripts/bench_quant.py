"""int8 weights against bfloat16 on a trained model: bytes, logits, WikiText-2 perplexity and decode speed.

    flock -x /work/cpu.lock .venv/bin/python scripts/bench_quant.py --workdir runs/wiki10m \
        --text ../shared/data/wikitext-2/raw/wiki.test.raw [--windows 200]

Exports the workdir twice into a temporary folder with the real command's function
(`checkpoint.export_params`): `--dtype bfloat16`, and `--quantize int8 --dtype bfloat16` (every
projection int8, the rest bfloat16), and loads both with `llm_jax.load`. Prints one JSON line:

- `param_bytes_*` and `bytes_ratio`: the loaded parameters' bytes (int8 / bf16).
- `logits_max_abs_diff`, `logits_std`: the worst difference between the two models' logits over
  every position evaluated, and the spread of the bf16 logits for scale.
- `ppl_*`, `ppl_change`: token perplexity over the first `--windows` non-overlapping windows of
  the model's max_len tokens of `--text` (CRLF normalised), each window scored on its own.
- `decode_tokens_per_s_*`, `speed_ratio`: greedy `generate`, batch 1, a 64-token prompt, 128 new
  tokens (best of `--repeats`, contenders interleaved, compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import tempfile
import time

import jax
import numpy as np

import llm_jax
from llm_jax import checkpoint, sampling


def cpu_model() -> str:
  lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
  return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def param_bytes(params) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(params))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--text", required=True)
  parser.add_argument("--windows", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    bf16 = llm_jax.load(checkpoint.export_params(args.workdir, pathlib.Path(tmp) / "bf16", dtype="bfloat16"))
    int8 = llm_jax.load(checkpoint.export_params(args.workdir, pathlib.Path(tmp) / "int8", dtype="bfloat16",
                                                 quantize="int8"))
  cfg = bf16.config.model
  text = pathlib.Path(args.text).read_text(encoding="utf-8").replace("\r\n", "\n")
  ids = np.asarray(bf16.tokenizer.encode(text), np.int32)
  window = cfg.max_len
  count = min(args.windows, len(ids) // window)
  windows = ids[:count * window].reshape(count, window)
  nll, worst, spread = {"bf16": 0.0, "int8": 0.0}, 0.0, []
  for start in range(0, count, 8):
    batch = windows[start:start + 8]
    logits = {name: m.logits(batch) for name, m in (("bf16", bf16), ("int8", int8))}
    worst = max(worst, float(np.abs(logits["int8"] - logits["bf16"]).max()))
    spread.append(float(logits["bf16"].std()))
    for name, value in logits.items():
      log_probs = np.asarray(jax.nn.log_softmax(value[:, :-1], axis=-1))
      nll[name] -= float(np.take_along_axis(log_probs, batch[:, 1:, None], axis=-1).sum())
  scored = count * (window - 1)
  ppl = {name: float(np.exp(total / scored)) for name, total in nll.items()}

  prompt = [ids[:64].tolist()]
  run = {name: (lambda m=m: sampling.generate(m.params, cfg, prompt, max_new_tokens=128))
         for name, m in (("bf16", bf16), ("int8", int8))}
  for fn in run.values():
    fn()  # compile
  seconds: dict[str, list[float]] = {name: [] for name in run}
  for _ in range(args.repeats):
    for name, fn in run.items():
      start = time.perf_counter()
      fn()
      seconds[name].append(time.perf_counter() - start)
  speed = {name: round(128 / min(s), 1) for name, s in seconds.items()}
  print(json.dumps({
      "workdir": args.workdir, "params": int(sum(x.size for x in jax.tree.leaves(bf16.params))),
      "param_bytes_bf16": param_bytes(bf16.params), "param_bytes_int8": param_bytes(int8.params),
      "bytes_ratio": round(param_bytes(int8.params) / param_bytes(bf16.params), 4),
      "logits_max_abs_diff": round(worst, 4), "logits_std": round(float(np.mean(spread)), 3),
      "windows": count, "tokens_scored": scored, "ppl_bf16": round(ppl["bf16"], 4), "ppl_int8": round(ppl["int8"], 4),
      "ppl_change": round(ppl["int8"] / ppl["bf16"] - 1, 5), "compute_dtype": cfg.dtype,
      "decode_tokens_per_s_bf16": speed["bf16"], "decode_tokens_per_s_int8": speed["int8"],
      "speed_ratio": round(speed["int8"] / speed["bf16"], 3), "cpu": cpu_model(), "cpus": os.cpu_count(),
      "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
  main()
