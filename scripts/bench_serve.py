"""A bounded load against `llm-jax serve` on 127.0.0.1, and the same prompts one by one through `generate`.

    flock -x /work/cpu.lock .venv/bin/python scripts/bench_serve.py --workdir runs/wiki10m \
        [--requests 64 --concurrency 8 --slots 8 --prompt-len 32 --max-tokens 64]

Starts the real server (`python -m llm_jax serve`, --slots) as a subprocess, warms every prompt
bucket, then sends `--requests` streaming greedy completions, `--concurrency` at a time, each
prompt `--prompt-len` token ids (seeded random ids, so every prompt has the same length) asking
for `--max-tokens` tokens. In the same run, after the server is stopped, this process loads the
model and runs the same prompts one by one through `sampling.generate` (compiled first), and
checks that both gave the same tokens. Prints one JSON line:

- `requests_per_s`, `tokens_per_s`: completed requests and generated tokens over the wall time
  of the whole load (tokens counted from the streams, eos included where a row stopped early).
- `ttft_ms_median`, `ttft_ms_p99`: from sending a request to its first streamed token.
- `per_token_ms_median`, `per_token_ms_p99`: each request's (last token time - first token
  time) / (tokens - 1), the time between tokens a client sees.
- `generate`: the same figures one by one: its time to first token is a one-token `generate`
  call per prompt, its per-token time (time of the full call - that) / (tokens - 1).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

import llm_jax
from llm_jax import sampling


def cpu_model() -> str:
  lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
  return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def stream(port: int, prompt: list[int], max_tokens: int) -> tuple[list[int], float, list[float]]:
  """One streaming greedy completion: (its tokens, the send time, the arrival time of each token)."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  sent = time.perf_counter()
  conn.request("POST", "/v1/completions", body=json.dumps({"prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0, "stream": True}),
               headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  assert response.status == 200, response.read()
  tokens, times = [], []
  for line in response:
    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
      continue
    new = json.loads(line[6:])["choices"][0]["token_ids"]
    now = time.perf_counter()
    tokens += new
    times += [now] * len(new)
  conn.close()
  return tokens, sent, times


def summary(wall: float, tokens: int, requests: int, ttft: list[float], per_token: list[float]) -> dict[str, float]:
  return {"wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3), "tokens_per_s": round(tokens / wall, 1),
          "ttft_ms_median": round(1000 * float(np.median(ttft)), 2),
          "ttft_ms_p99": round(1000 * float(np.percentile(ttft, 99)), 2),
          "per_token_ms_median": round(1000 * float(np.median(per_token)), 3),
          "per_token_ms_p99": round(1000 * float(np.percentile(per_token, 99)), 3)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--concurrency", type=int, default=8)
  parser.add_argument("--slots", type=int, default=8)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--max-tokens", type=int, default=64)
  args = parser.parse_args()

  model = llm_jax.load(args.workdir)
  rng = np.random.RandomState(0)
  low = 3 + max(model.tokenizer.eos_id, model.tokenizer.bos_id)  # no special tokens inside the prompts
  prompts = [rng.randint(low, min(model.config.model.vocab_size, 259), args.prompt_len).tolist()
             for _ in range(args.requests)]

  port = free_port()
  server = subprocess.Popen([sys.executable, "-m", "llm_jax", "serve", "--workdir", args.workdir, "--port", str(port),
                             "--slots", str(args.slots)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    while True:
      assert server.poll() is None, server.stderr.read().decode()[-3000:]
      try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        if conn.getresponse().status == 200:
          break
      except OSError:
        time.sleep(0.5)
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:  # warm-up: this prompt bucket compiles
      list(pool.map(lambda p: stream(port, p, 4), prompts[:args.concurrency]))
      start = time.perf_counter()
      results = list(pool.map(lambda p: stream(port, p, args.max_tokens), prompts))
      wall = time.perf_counter() - start
  finally:
    server.terminate()
    server.wait(timeout=60)
  served = summary(wall, sum(len(t) for t, _, _ in results), len(results),
                   [times[0] - sent for _, sent, times in results],
                   [(times[-1] - times[0]) / (len(times) - 1) for _, _, times in results if len(times) > 1])

  cfg, eos = model.config.model, model.tokenizer.eos_id
  one = lambda p, n: sampling.generate(model.params, cfg, [p], max_new_tokens=n, eos_id=eos)[0]  # noqa: E731
  one(prompts[0], args.max_tokens), one(prompts[0], 1)  # compile both budgets' buckets
  full, lengths, same = [], [], True
  start = time.perf_counter()
  for prompt, (served_tokens, _, _) in zip(prompts, results):
    t0 = time.perf_counter()
    completion = one(prompt, args.max_tokens)
    full.append(time.perf_counter() - t0)
    lengths.append(len(completion.tokens))
    same &= completion.tokens == served_tokens
  wall_generate = time.perf_counter() - start
  ttft = []
  for prompt in prompts:
    t0 = time.perf_counter()
    one(prompt, 1)
    ttft.append(time.perf_counter() - t0)
  per_token = [max(0.0, f - t) / (n - 1) for f, t, n in zip(full, ttft, lengths) if n > 1]
  generate = summary(wall_generate, sum(lengths), len(prompts), ttft, per_token)
  print(json.dumps({"workdir": args.workdir, "requests": args.requests, "concurrency": args.concurrency,
                    "slots": args.slots, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, **served,
                    "generate": generate, "tokens_per_s_ratio": round(served["tokens_per_s"] / generate["tokens_per_s"], 2),
                    "same_tokens_as_generate": bool(same), "cpu": cpu_model(), "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
  main()
