"""Input pipeline throughput: tokens/s through tokenize, pack and batch, single process, on the host.

  .venv/bin/python scripts/bench_data.py [--shared ../shared/data] [--seconds 5]

Runs `make_batches` (mesh=None, no workers) on tiny_shakespeare (one document per file, cut into
pieces) and wikitext-2 (valid + test, one document per blank-line block) with the byte tokenizer
and with a sentencepiece BPE tokenizer of vocab 8192 that it trains on both corpora in a
temporary directory. Each figure is the steady-state rate after the first batch (first_batch_s
is the start-up: reading, counting and the first batch). Prints one JSON line; "ratio" is the
slowest rate over what the gpt-10m preset's train step consumes, measured in the same run with
scripts/bench_train.py's `measure_step`; the issue asks for at least 20.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import bench_train  # scripts/bench_train.py, beside this file
from llm_jax.config import DataConfig
from llm_jax.data import pipeline, tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH_SIZE, SEQ_LEN = 16, 256  # configs/tiny_shakespeare.py: what the gpt-10m step consumes per step


def corpora(shared: pathlib.Path) -> dict[str, DataConfig]:
  return {
      "tiny_shakespeare": DataConfig(source=f"text:{shared}/tiny_shakespeare/input.txt", seq_len=SEQ_LEN),
      "wikitext-2": DataConfig(source=f"text:{shared}/wikitext-2/*.txt", text_split="blank_line", seq_len=SEQ_LEN),
  }


def measure(data: DataConfig, tok: tokenizer.Tokenizer, seconds: float) -> dict[str, float]:
  start = time.perf_counter()
  with pipeline.make_batches(data, tok, batch_size=BATCH_SIZE, seed=0, mesh=None) as batches:
    next(batches)
    first = time.perf_counter() - start
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      tokens += next(batches)["inputs"].size
    elapsed = time.perf_counter() - start
  return {"tokens_per_sec": round(tokens / elapsed), "first_batch_s": round(first, 3), "tokens": tokens}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=REPO.parent / "shared" / "data")
  parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per case")
  args = parser.parse_args()
  data = corpora(args.shared)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    inputs = [f"{args.shared}/tiny_shakespeare/input.txt", f"{args.shared}/wikitext-2/*.txt"]
    sp = tokenizer.load_tokenizer(str(tokenizer.train_sentencepiece(inputs, 8192, f"{tmp}/sp8192.model")))
    train_s = time.perf_counter() - start
    results = {f"{name}/{label}": measure(config, tok, args.seconds)
               for name, config in data.items() for label, tok in (("byte", tokenizer.ByteTokenizer()), ("sp8192", sp))}
  slowest = min(r["tokens_per_sec"] for r in results.values())
  step = bench_train.measure_step("gpt-10m", steps=10)
  print(json.dumps({"batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "sentencepiece_train_s": round(train_s, 2),
                    "results": results, "min_tokens_per_sec": slowest,
                    "step_tokens_per_sec": step["tokens_per_sec"], "ratio": round(slowest / step["tokens_per_sec"], 1)}))


if __name__ == "__main__":
  main()
