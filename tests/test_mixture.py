"""data.mixture: proportions, exact resume after SIGKILL, disjoint rows over processes, per-source eval."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.config import DataConfig
from llm_jax.data import mixture, pipeline, pretokenize
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.errors import UserError
from jax_processes import run_processes

BYTES = ByteTokenizer()
REPO = pathlib.Path(__file__).resolve().parents[1]
LETTERS, DIGITS = "abcdefghij", "0123456789"


def write_files(directory: pathlib.Path, alphabet: str, count: int = 12) -> str:
  """Documents of one alphabet, so a row's source shows in its bytes."""
  directory.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    (directory / f"{i:02d}.txt").write_text("".join(alphabet[(i * 7 + k) % 10] for k in range(40 + 13 * i)) + "\n")
  return f"text:{directory}/*.txt"


@pytest.fixture(scope="module")
def sources_ab(tmp_path_factory):
  """A tokens:DIR of letters and a text: source of digits."""
  root = tmp_path_factory.mktemp("mix")
  letters = write_files(root / "letters", LETTERS)
  pretokenize.tokenize(DataConfig(source=letters, chunk_chars=8192), "byte", root / "letters_tokens",
                       say=lambda _: None)
  return f"tokens:{root / 'letters_tokens'}", write_files(root / "digits", DIGITS)


def mixed(sources_ab, weights=(0.8, 0.2), **kwargs):
  return DataConfig(mixture=tuple(zip(sources_ab, weights)), seq_len=16, **kwargs)


def row_sources(batch) -> list[int]:
  """0 for a row of letters, 1 for digits (each row holds one source's bytes and eos only)."""
  letter_ids = [ord(c) + 4 for c in LETTERS]
  return [0 if np.isin(row, letter_ids).any() else 1 for row in batch["inputs"]]


def digest(batch) -> str:
  return hashlib.sha256(b"".join(np.ascontiguousarray(batch[k]).tobytes() for k in sorted(batch))).hexdigest()


def test_schedule_deals_each_block_by_weight():
  schedule = mixture.Schedule([0.5, 0.3, 0.2], seed=0)
  totals = sum(schedule.counts(b) for b in range(7))
  assert all(schedule.counts(b).sum() == mixture.BLOCK for b in range(7))
  np.testing.assert_array_equal(totals, [350, 210, 140])
  rare = mixture.Schedule([0.999, 0.001], seed=0)  # a tiny weight still gets its rows over time
  assert sum(rare.counts(b)[1] for b in range(20)) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proportions_over_2000_rows(sources_ab, seed):
  batches = pipeline.make_batches(mixed(sources_ab), BYTES, batch_size=8, seed=seed, mesh=None)
  per_batch = [row_sources(next(batches)) for _ in range(250)]
  share = np.mean([s == 0 for rows in per_batch for s in rows])
  assert abs(share - 0.8) <= 0.02
  assert any(0 < sum(rows) < 8 for rows in per_batch)  # sources interleave within batches, not batch by batch


def test_bad_mixtures_fail_in_one_line(tmp_path, sources_ab):
  for weight in ("0", "-0.5"):
    with pytest.raises(UserError, match=rf"has weight {weight}; weights must be positive numbers"):
      config_lib.override(config_lib.Config(), [f"data.mixture=[(text:a, 1), (text:b, {weight})]"])
  letters = write_files(tmp_path / "letters", LETTERS)
  sp = tmp_path / "sp"
  from llm_jax.data import tokenizer
  model = tokenizer.train_sentencepiece([f"{tmp_path}/letters/*.txt"], 300, str(sp / "sp.model"))
  pretokenize.tokenize(DataConfig(source=letters, chunk_chars=8192), str(model), tmp_path / "sp_tokens",
                       say=lambda _: None)
  data = DataConfig(mixture=((sources_ab[0], 1.0), (f"tokens:{tmp_path / 'sp_tokens'}", 1.0)), seq_len=16)
  with pytest.raises(UserError) as error:
    pipeline.make_batches(data, BYTES, batch_size=8, seed=0, mesh=None)
  assert str(error.value) == (f"data.mixture mixes {sources_ab[0]} and tokens:{tmp_path / 'sp_tokens'}, which were "
                              "tokenized with different tokenizers; tokenize every source with the one data.tokenizer "
                              "of the run")


KILLED_SCRIPT = """
import json, os, pathlib, sys, hashlib
import numpy as np
from llm_jax.config import DataConfig
from llm_jax.data import pipeline, tokenizer

out = pathlib.Path(sys.argv[1])
data = DataConfig(mixture=tuple(map(tuple, json.loads(sys.argv[2]))), seq_len=16, prefetch=3)
batches = pipeline.make_batches(data, tokenizer.ByteTokenizer(), batch_size=8, seed=11, mesh=None)
saved = sorted(out.glob("*.json"))
k = 0
if saved:  # resume from the last batch whose state was saved, as the trainer does from its checkpoint
  last = json.loads(saved[-1].read_text())
  batches.set_state(last["state"])
  k = last["k"]
while k < 24:
  batch = next(batches)
  k += 1
  digest = hashlib.sha256(b"".join(np.ascontiguousarray(batch[key]).tobytes() for key in sorted(batch))).hexdigest()
  tmp = out / "tmp"
  tmp.write_text(json.dumps({"k": k, "digest": digest, "state": batches.get_state()}))
  os.replace(tmp, out / f"{k:03d}.json")
"""


def test_sigkill_mid_mixture_then_resume_gives_the_same_batches(tmp_path, sources_ab):
  script, out = tmp_path / "run.py", tmp_path / "out"
  script.write_text(KILLED_SCRIPT)
  out.mkdir()
  args = [sys.executable, str(script), str(out), json.dumps([[s, w] for s, w in zip(sources_ab, (0.7, 0.3))])]
  process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 120
  while len(list(out.glob("*.json"))) < 9 and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = len(list(out.glob("*.json")))
  assert 9 <= killed_at < 24, process.stderr.read()[-2000:]
  resumed = subprocess.run(args, capture_output=True, text=True, timeout=240)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  got = [json.loads((out / f"{k:03d}.json").read_text())["digest"] for k in range(1, 25)]
  data = mixed(sources_ab, (0.7, 0.3))
  batches = pipeline.make_batches(data, BYTES, batch_size=8, seed=11, mesh=None)
  assert got == [digest(next(batches)) for _ in range(24)]


DISTRIBUTED_SCRIPT = """
import json
import jax
import numpy as np
from llm_jax import distributed
from llm_jax.config import DataConfig, MeshConfig
from llm_jax.data import pipeline, tokenizer

distributed.initialize(MeshConfig())
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
data = DataConfig(mixture=tuple(map(tuple, json.loads({mixture!r}))), seq_len=16)
iterator = pipeline.make_batches(data, tokenizer.ByteTokenizer(), batch_size=8, seed=5, mesh=mesh)
local = []
for _ in range(4):
  batch = next(iterator)
  local.append({{str(s.index[0].start): np.asarray(s.data).tolist() for s in batch["inputs"].addressable_shards}})
state = iterator.get_state()
print(json.dumps({{"process": jax.process_index(), "rows": iterator.rows, "local": local, "state": state}}))
"""


@pytest.mark.slow
def test_two_processes_read_disjoint_rows_whose_union_is_the_single_process_stream(sources_ab):
  mix = json.dumps([[s, w] for s, w in zip(sources_ab, (0.6, 0.4))])
  outputs = run_processes(DISTRIBUTED_SCRIPT.format(mixture=mix), num_processes=2, devices_per_process=4)
  results = sorted((json.loads(o.strip().splitlines()[-1]) for o in outputs), key=lambda r: r["process"])
  assert [r["rows"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  single = pipeline.make_batches(mixed(sources_ab, (0.6, 0.4)), BYTES, batch_size=8, seed=5, mesh=None)
  for k in range(4):
    want = next(single)["inputs"]
    rows = {}
    for result in results:
      for start, shard in result["batches" if "batches" in result else "local"][k].items():
        for i, row in enumerate(shard):
          assert int(start) + i in result["rows"]  # each process holds only its own rows
          rows.setdefault(int(start) + i, row)
    assert sorted(rows) == list(range(8))
    assert [rows[r] for r in range(8)] == want.tolist()
  assert results[0]["state"] == results[1]["state"] == single.get_state()  # every source's position, gathered


MAKE_DATASET = """
import sys
import datasets
texts = ["".join("0123456789"[(i + k) % 10] for k in range(30 + i)) for i in range(40)]
datasets.Dataset.from_dict({"text": texts, "id": list(range(40))}).save_to_disk(sys.argv[1])
"""


@pytest.mark.slow
def test_training_on_a_mixture_reports_eval_loss_per_source(tmp_path, sources_ab):
  """A datasets save_to_disk folder made here, mixed with token shards, trains through the real CLI; eval is
  per source."""
  made = subprocess.run([sys.executable, "-c", MAKE_DATASET, str(tmp_path / "hf")], capture_output=True, text=True)
  assert made.returncode == 0, made.stderr[-2000:]
  mix = f"[({sources_ab[0]}, 3), (hf:{tmp_path / 'hf'}, 1)]"
  args = [sys.executable, "-m", "llm_jax", "train", "--config", str(REPO / "tests/gpt2_bytes_config.py"),
          "--workdir", str(tmp_path / "run"), f"data.mixture={mix}", "data.eval_fraction=0.2", "data.seq_len=16",
          "model.max_len=16", "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=2",
          "model.d_ff=64", "train.steps=4", "train.batch_size=8", "train.log_every=2", "train.eval_every=4",
          "train.eval_batches=1", "sample.max_new_tokens=4"]
  result = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "true"})
  assert result.returncode == 0, result.stderr[-3000:]
  names = mixture.labels(config_lib.override(config_lib.Config(), [f"data.mixture={mix}"]).data.mixture)
  assert names == ["letters_tokens", "hf"]
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  evaluated = [r for r in records if "eval_loss" in r][-1]
  per_source = [evaluated[f"eval_loss/{name}"] for name in names]
  assert all(np.isfinite(per_source)) and per_source[0] != per_source[1]
  assert evaluated["eval_loss"] == pytest.approx(0.75 * per_source[0] + 0.25 * per_source[1])
  assert evaluated["step"] == 4
