"""Input pipeline throughput: tokens/s through tokenize, pack and batch, single process, on the host;
and, at pretraining scale, `llm-jax data tokenize` and training from its shards.

  .venv/bin/python scripts/bench_data.py [--shared ../shared/data] [--seconds 5] [--scale-dir /tmp/llm_jax_bench]

Runs `make_batches` (mesh=None, no workers) on tiny_shakespeare (one document per file, cut into
pieces) and wikitext-2 (valid + test, one document per blank-line block) with the byte tokenizer
and with a sentencepiece BPE tokenizer of vocab 8192 that it trains on both corpora in a
temporary directory. Each figure is the steady-state rate after the first batch (first_batch_s
is the start-up: reading, counting and the first batch). Prints one JSON line; "ratio" is the
slowest rate over what the gpt-10m preset's train step consumes, measured in the same run with
scripts/bench_train.py's `measure_step`; the issue asks for at least 20.

At scale ("scale" in the JSON; --no-scale skips it): the script generates corpora of 100 MB and 1 GB
of text under --scale-dir (blank-line separated documents of Zipf-distributed words, 64 MB files;
kept for the next run, never committed), then measures `pretokenize.tokenize` with the byte
tokenizer on the 1 GB corpus with 1 and 2 workers (MB of text per second) and with the
sentencepiece model on the 100 MB corpus with 1 and 2 workers; the pipeline's tokens/s from the
1 GB corpus's shards; and the resident memory of a process that builds the pipeline and reads 8M
tokens from tokens:DIR and from the raw text: source, for each corpus size (a fresh process each:
VmRSS after imports and after reading, and the peak VmHWM, which imports set).
"""

from __future__ import annotations

import argparse
import json
import operator
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import bench_train  # scripts/bench_train.py, beside this file
from llm_jax.config import DataConfig
from llm_jax.data import pipeline, pretokenize, tokenizer

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


def generate_corpus(directory: pathlib.Path, total_mb: int, seed: int, file_mb: int = 64) -> pathlib.Path:
  """Files of blank-line separated documents (50 to 2,000 words) of Zipf-distributed words; reused when present."""
  done = directory / "DONE"
  if done.is_file():
    return directory
  shutil.rmtree(directory, ignore_errors=True)
  directory.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  vocab = [f"w{i}" for i in range(50_000)] + ["the", "of", "and", "a", "to", "in", "is", ",", "."]
  cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1))
  written, k = 0, 0
  while written < total_mb << 20:
    ids = np.searchsorted(cdf, rng.random((file_mb << 20) // 6) * cdf[-1])
    words = operator.itemgetter(*ids.tolist())(vocab)
    bounds = np.cumsum(rng.integers(50, 2000, size=len(words) // 50))
    bounds = [0] + bounds[bounds < len(words)].tolist() + [len(words)]
    text = "\n\n".join(" ".join(words[a:b]) for a, b in zip(bounds, bounds[1:])) + "\n"
    path = directory / f"{k:03d}.txt"
    path.write_text(text)
    written, k = written + path.stat().st_size, k + 1
  done.write_text(str(written))
  return directory


def tokenize_rate(corpus: pathlib.Path, out: pathlib.Path, tokenizer_spec: str, workers: int) -> dict[str, float]:
  shutil.rmtree(out, ignore_errors=True)
  size = sum(f.stat().st_size for f in corpus.glob("*.txt"))
  data = DataConfig(source=f"text:{corpus}/*.txt", text_split="blank_line", chunk_chars=32 * SEQ_LEN)
  start = time.perf_counter()
  manifest = pretokenize.tokenize(data, tokenizer_spec, out, workers=workers, say=lambda _: None)
  elapsed = time.perf_counter() - start
  return {"workers": workers, "mb_per_sec": round(size / 2**20 / elapsed, 1),
          "tokens_per_sec": round(manifest["totals"]["tokens"] / elapsed), "seconds": round(elapsed, 1),
          "tokens": manifest["totals"]["tokens"], "shard_mb": round(sum(f.stat().st_size for f in out.iterdir()) / 2**20)}


RSS_TOKENS = 8 << 20


def peak_rss(source: str) -> dict[str, float]:
  """Peak RSS of a fresh process that builds the pipeline on `source` and reads RSS_TOKENS tokens."""
  result = subprocess.run([sys.executable, __file__, "--rss-child", source], capture_output=True, text=True, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


def rss_child(source: str) -> None:
  """Prints the resident set after imports and after reading, and the peak (VmHWM), in MB."""
  def status_mb(key: str) -> float:
    line = next(l for l in pathlib.Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024
  start = status_mb("VmRSS")
  data = DataConfig(source=source, text_split="blank_line", seq_len=SEQ_LEN, eval_fraction=0.0)
  tokens = 0
  with pipeline.make_batches(data, tokenizer.ByteTokenizer(), batch_size=BATCH_SIZE, seed=0, mesh=None) as batches:
    while tokens < RSS_TOKENS:
      tokens += next(batches)["inputs"].size
    end = status_mb("VmRSS")
  print(json.dumps({"peak_mb": round(status_mb("VmHWM")), "rss_after_imports_mb": round(start),
                    "rss_after_reading_mb": round(end), "growth_mb": round(end - start, 1)}))


def scale(root: pathlib.Path, sp_model: str, seconds: float) -> dict:
  small = generate_corpus(root / "corpus_100mb", 100, seed=1)
  large = generate_corpus(root / "corpus_1gb", 1024, seed=2)
  out = {"corpus_mb": {"100mb": round(int((small / "DONE").read_text()) / 2**20),
                       "1gb": round(int((large / "DONE").read_text()) / 2**20)}}
  out["tokenize_byte_1gb"] = [tokenize_rate(large, root / "shards_1gb", "byte", w) for w in (1, 2)]
  out["tokenize_sp8192_100mb"] = [tokenize_rate(small, root / "shards_sp", sp_model, w) for w in (1, 2)]
  tokenize_rate(small, root / "shards_100mb", "byte", 2)
  tokens = DataConfig(source=f"tokens:{root / 'shards_1gb'}", seq_len=SEQ_LEN)
  raw = DataConfig(source=f"text:{large}/*.txt", text_split="blank_line", seq_len=SEQ_LEN)
  out["pipeline_1gb"] = {"tokens:DIR": measure(tokens, tokenizer.ByteTokenizer(), seconds),
                         "text:GLOB": measure(raw, tokenizer.ByteTokenizer(), seconds)}
  out["peak_rss"] = {name: {"100mb": peak_rss(small_source), "1gb": peak_rss(large_source)}
                     for name, small_source, large_source in (
                         ("tokens:DIR", f"tokens:{root / 'shards_100mb'}", f"tokens:{root / 'shards_1gb'}"),
                         ("text:GLOB", f"text:{small}/*.txt", f"text:{large}/*.txt"))}
  for sizes in out["peak_rss"].values():
    sizes["ratio_1gb_to_100mb"] = round(sizes["1gb"]["rss_after_reading_mb"] / sizes["100mb"]["rss_after_reading_mb"], 3)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=pathlib.Path, default=REPO.parent / "shared" / "data")
  parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per case")
  parser.add_argument("--scale-dir", type=pathlib.Path, default=pathlib.Path("/tmp/llm_jax_bench"))
  parser.add_argument("--no-scale", action="store_true", help="skip the generated 100 MB and 1 GB corpora")
  parser.add_argument("--rss-child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.rss_child:
    return rss_child(args.rss_child)
  data = corpora(args.shared)
  cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1]
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    inputs = [f"{args.shared}/tiny_shakespeare/input.txt", f"{args.shared}/wikitext-2/*.txt"]
    sp_model = str(tokenizer.train_sentencepiece(inputs, 8192, f"{tmp}/sp8192.model"))
    sp = tokenizer.load_tokenizer(sp_model)
    train_s = time.perf_counter() - start
    results = {f"{name}/{label}": measure(config, tok, args.seconds)
               for name, config in data.items() for label, tok in (("byte", tokenizer.ByteTokenizer()), ("sp8192", sp))}
    at_scale = None if args.no_scale else scale(args.scale_dir, sp_model, args.seconds)
  if at_scale:
    results["generated_1gb/tokens:DIR"] = at_scale["pipeline_1gb"]["tokens:DIR"]
  slowest = min(r["tokens_per_sec"] for r in results.values())
  step = bench_train.measure_step("gpt-10m", steps=10)
  print(json.dumps({"cpu": cpu.strip(), "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN,
                    "sentencepiece_train_s": round(train_s, 2), "results": results, "min_tokens_per_sec": slowest,
                    "step_tokens_per_sec": step["tokens_per_sec"], "ratio": round(slowest / step["tokens_per_sec"], 1),
                    "scale": at_scale}))


if __name__ == "__main__":
  main()
