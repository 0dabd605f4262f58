"""Sources read lazily: a JSONL corpus larger than the memory budget streams; Hugging Face datasets offline."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from llm_jax.config import DataConfig
from llm_jax.data import sources

CORPUS_MB = 200
BUDGET_MB = 40  # the pipeline's RSS may grow by this much reading the whole corpus: a fifth of its size


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory) -> pathlib.Path:
  """~200 MB of JSONL records of 4 KB (unique text each), written in blocks."""
  path = tmp_path_factory.mktemp("big") / "corpus.jsonl"
  words = [f"word{i} " for i in range(1000)]
  with open(path, "w") as f:
    record = 0
    while f.tell() < CORPUS_MB << 20:
      block = []
      for _ in range(1000):
        text = f"record {record}: " + "".join(words[(record * 7 + k * 13) % 1000] for k in range(560))
        block.append(json.dumps({"text": text, "id": record}) + "\n")
        record += 1
      f.write("".join(block))
  return path


RSS_SCRIPT = """
import json, resource, sys
import numpy as np
from llm_jax.config import DataConfig
from llm_jax.data import pipeline, tokenizer

def peak_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

start = peak_mb()
data = DataConfig(source="jsonl:" + sys.argv[1], seq_len=256, eval_fraction=0.0)
batches = pipeline.make_batches(data, tokenizer.ByteTokenizer(), batch_size=16, seed=0, mesh=None)
tokens = 0
while tokens < 2 * 1024**2:  # 2M tokens, read at random all over the file
  tokens += next(batches)["inputs"].size
print(json.dumps({"start_mb": start, "peak_mb": peak_mb(), "pieces": batches.get_state()["pieces"]}))
"""


def test_a_jsonl_corpus_larger_than_the_budget_streams(big_jsonl, tmp_path):
  script = tmp_path / "rss.py"
  script.write_text(RSS_SCRIPT)
  result = subprocess.run([sys.executable, str(script), str(big_jsonl)], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  size_mb = big_jsonl.stat().st_size / 2**20
  assert size_mb >= CORPUS_MB and out["pieces"] > 40_000
  growth = out["peak_mb"] - out["start_mb"]
  assert growth < BUDGET_MB, f"the pipeline grew by {growth:.0f} MB reading a {size_mb:.0f} MB corpus"
  print(f"RSS growth {growth:.1f} MB for a {size_mb:.0f} MB corpus")


def test_jsonl_pieces_are_read_back_exactly(tmp_path):
  long = "line\n" * 3000  # 15,000 characters: cut into pieces by data.chunk_chars
  records = [{"text": "café ☕ first"}, {"text": long}, {"text": "  "}, {"text": "last"}]
  (tmp_path / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  docs = sources.load(DataConfig(source=f"jsonl:{tmp_path}/a.jsonl", chunk_chars=4000, eval_fraction=0.0), "train")
  pieces = [docs[i] for i in range(len(docs))]
  assert pieces[0] == ("café ☕ first", True) and pieces[-1] == ("last", True)
  assert "".join(text for text, _ in pieces[1:-1]) == long and [e for _, e in pieces[1:-1]] == [False] * 3 + [True]
  assert [docs[i] for i in reversed(range(len(docs)))] == pieces[::-1]  # random access, any order


MAKE_DATASETS = """
import sys
import datasets
texts = [f"document {i}: " + "abc " * i for i in range(30)]
train = datasets.Dataset.from_dict({"text": texts, "n": list(range(30))})
datasets.DatasetDict({"train": train, "validation": train.select(range(5))}).save_to_disk(sys.argv[1] + "/dict")
train.save_to_disk(sys.argv[1] + "/plain")
train.to_parquet(sys.argv[1] + "/data.parquet")
"""

READ_DATASETS = """
import json, sys
from llm_jax.config import DataConfig
from llm_jax.data import sources
from llm_jax.errors import UserError

def texts(spec, split="train", **kw):
  docs = sources.load(DataConfig(source=spec, eval_fraction=0.0, **kw), split)
  return [docs[i] for i in range(len(docs))]

root = sys.argv[1]
out = {"dict": texts(f"hf:{root}/dict"), "eval": texts(f"hf:{root}/dict", "eval"),
       "plain": texts(f"hf:{root}/plain"), "parquet": texts(f"hf:{root}/data.parquet"),
       "cut": len(texts(f"hf:{root}/plain", chunk_chars=20))}
for spec, kw in [("hf:some-user/some-dataset", {}), (f"hf:{root}/dict:test", {}), (f"hf:{root}/plain", {"text_field": "body"})]:
  try:
    texts(spec, **kw)
  except UserError as e:
    out[spec] = str(e)
print(json.dumps(out))
"""


def test_hugging_face_datasets_offline(tmp_path):
  """In a subprocess: datasets reads HF_HUB_OFFLINE when it is imported, so the offline hub path is the real one."""
  for script in (MAKE_DATASETS, READ_DATASETS):
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  want = [[f"document {i}: " + "abc " * i, True] for i in range(30)]
  assert out["dict"] == out["plain"] == out["parquet"] == want
  assert out["eval"] == want[:5]  # the folder's own validation split
  assert out["cut"] > 30  # documents over chunk_chars are cut into pieces
  offline = out["hf:some-user/some-dataset"]
  assert offline.startswith("hf:some-user/some-dataset is not a local folder and the Hugging Face hub is unreachable")
  assert "save_to_disk(DIR)" in offline and "\n" not in offline
  assert out[f"hf:{tmp_path}/dict:test"] == f"hf:{tmp_path}/dict has no split 'test' (it has ['train', 'validation']); write hf:{tmp_path}/dict:SPLIT"
  assert out[f"hf:{tmp_path}/plain"] == (f"hf:{tmp_path}/plain has no column 'body' (it has ['text', 'n']); set data.text_field")
