"""The batch pipeline: packing, order, resumption, sharding over devices, processes and workers."""

import dataclasses
import json
import logging
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from llm_jax import sharding
from llm_jax.config import DataConfig
from llm_jax.data import packing, pipeline, sources, tfds_source
from llm_jax.data.documents import DataError
from llm_jax.data.tokenizer import ByteTokenizer, EOS_ID
from jax_processes import run_processes  # tests/jax_processes.py (pytest puts tests/ on sys.path)

BYTES = ByteTokenizer()
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def corpus(directory: pathlib.Path, lengths: list[int]) -> str:
  """Files 00.txt, 01.txt, ... of the given lengths, each text unique; returns the text:GLOB source."""
  directory.mkdir(parents=True, exist_ok=True)
  for i, n in enumerate(lengths):
    text = (f"<{i:02d}>" + "".join(chr(97 + (i + k) % 26) if k % 9 else "\n" for k in range(n)))[:n]
    (directory / f"{i:02d}.txt").write_text(text)
  return f"text:{directory}/*.txt"


def take(iterator, n: int) -> list[dict]:
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for key in KEYS:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def mesh_of(data: int, fsdp: int, tensor: int) -> Mesh:
  return Mesh(np.array(jax.devices()).reshape(data, fsdp, tensor), ("data", "fsdp", "tensor"))


def reference_rows(pieces: list[tuple[str, bool]], row: int, batch_size: int, seq_len: int, n_rows: int) -> list[dict]:
  """Row slot `row` built the slow, obvious way: a list of (token, piece number) cut into rows."""
  stream, j = [], 0
  while len(stream) < n_rows * seq_len:
    text, ends = pieces[(row + j * batch_size) % len(pieces)]
    stream += [(t, j) for t in BYTES.encode(text) + ([EOS_ID] if ends else [])]
    j += 1
  rows = []
  for k in range(n_rows):
    cut = stream[k * seq_len:(k + 1) * seq_len]
    starts = [i == 0 or cut[i][1] != cut[i - 1][1] for i in range(seq_len)]
    segment, position, fields = 0, 0, {key: [] for key in KEYS}
    for i, (token, _) in enumerate(cut):
      segment, position = (segment + 1, 0) if starts[i] else (segment, position + 1)
      last = i == seq_len - 1
      fields["inputs"].append(token)
      fields["targets"].append(0 if last else cut[i + 1][0])
      fields["segment_ids"].append(segment)
      fields["positions"].append(position)
      fields["loss_mask"].append(0.0 if last or starts[i + 1] else 1.0)
    rows.append(fields)
  return rows


def test_batch_fields_at_boundaries():
  fields = packing.batch_fields(np.array([[10, 11, 12, 13, 14, 15]], np.int32), np.array([[1, 1, 2, 2, 2, 3]], np.int32))
  assert fields["positions"].tolist() == [[0, 1, 0, 1, 2, 0]]
  assert fields["targets"].tolist() == [[11, 12, 13, 14, 15, 0]]
  assert fields["loss_mask"].tolist() == [[1, 0, 1, 1, 0, 0]]
  assert {k: v.dtype.name for k, v in fields.items()} == {
      "inputs": "int32", "targets": "int32", "segment_ids": "int32", "positions": "int32", "loss_mask": "float32"}


@pytest.mark.parametrize("chunk_chars", [0, 40])
def test_packing_conserves_every_token_in_order(tmp_path, chunk_chars):
  """Eval order is the pieces in order, cycled: every row slot must equal the reference exactly,
  across documents shorter and longer than a row, pieces of cut documents and the wrap-around."""
  source = corpus(tmp_path, [5, 40, 130, 3, 77, 200, 18, 64, 31])
  data = DataConfig(source=source, eval_source=source, seq_len=32, chunk_chars=chunk_chars)
  batches = take(pipeline.make_batches(data, BYTES, batch_size=4, seed=0, mesh=None, split="eval"), 25)
  pieces = list(sources.load(data, "eval"))
  assert (sum(not ends for _, ends in pieces) > 5) == bool(chunk_chars)  # cut documents: eos only at their end
  for row in range(4):
    expected = reference_rows(pieces, row, 4, 32, 25)
    for batch, want in zip(batches, expected):
      for key in KEYS:
        assert batch[key][row].tolist() == want[key], (row, key)


def test_train_order_is_a_new_permutation_every_epoch(tmp_path):
  source = corpus(tmp_path, [20 + 7 * i for i in range(12)])
  data = DataConfig(source=source, seq_len=32, eval_fraction=0.0)

  def consumed(seed: int) -> list[int]:
    """Document numbers at global positions 0, 1, 2, ... (slot r took positions r, r + B, ...)."""
    batches = take(pipeline.make_batches(data, BYTES, batch_size=4, seed=seed, mesh=None), 30)
    by_position = {}
    for row in range(4):
      stream = np.concatenate([b["inputs"][row] for b in batches])
      documents = BYTES.decode(stream).split("<")[1:]  # specials (eos) drop out of decode
      complete = int((stream == EOS_ID).sum())
      for j, text in enumerate(documents[:complete]):
        by_position[row + 4 * j] = int(text[:2])
    return [by_position[g] for g in range(36)]  # three epochs of 12

  order = consumed(seed=7)
  epochs = [order[i:i + 12] for i in range(0, 36, 12)]
  assert all(sorted(epoch) == list(range(12)) for epoch in epochs)  # each document once per epoch
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(12))
  assert consumed(seed=7) == order
  assert consumed(seed=8)[:12] != epochs[0]


def test_same_seed_same_batches_different_seed_different_batches(tmp_path):
  data = DataConfig(source=corpus(tmp_path, [50 + 13 * i for i in range(30)]), seq_len=16)
  first = take(pipeline.make_batches(data, BYTES, batch_size=8, seed=1, mesh=None), 5)
  assert_same(first, take(pipeline.make_batches(data, BYTES, batch_size=8, seed=1, mesh=None), 5))
  other = take(pipeline.make_batches(data, BYTES, batch_size=8, seed=2, mesh=None), 5)
  assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])
  assert sorted(map(bytes, first[0]["inputs"][:, :4].astype(np.uint8))) != sorted(map(bytes, other[0]["inputs"][:, :4].astype(np.uint8)))


def test_eval_batches_are_the_same_from_every_fresh_iterator(tmp_path):
  data = DataConfig(source=corpus(tmp_path, [30 + 11 * i for i in range(20)]), seq_len=16, eval_fraction=0.25)
  first = take(pipeline.make_batches(data, BYTES, batch_size=4, seed=1, mesh=None, split="eval"), 6)
  assert_same(first, take(pipeline.make_batches(data, BYTES, batch_size=4, seed=9, mesh=None, split="eval"), 6))
  held = "".join(BYTES.decode(b["inputs"].reshape(-1)) for b in first)
  assert "<02>" in held and "<01>" not in held  # the held-out documents (2, 7, 12, 17), never training ones


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_state_continues_exactly(tmp_path, prefetch):
  data = DataConfig(source=corpus(tmp_path, [10 + 17 * i for i in range(25)]), seq_len=24, prefetch=prefetch)
  uninterrupted = take(pipeline.make_batches(data, BYTES, batch_size=4, seed=3, mesh=None), 10)
  iterator = pipeline.make_batches(data, BYTES, batch_size=4, seed=3, mesh=None)
  assert_same(take(iterator, 6), uninterrupted[:6])
  state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
  resumed = pipeline.make_batches(data, BYTES, batch_size=4, seed=3, mesh=None)
  resumed.set_state(state)
  assert_same(take(resumed, 4), uninterrupted[6:])
  iterator.set_state(state)  # rewinding a used iterator works too
  assert_same(take(iterator, 4), uninterrupted[6:])
  iterator.close()
  with pytest.raises(DataError, match="this batch iterator is closed"):
    next(iterator)


def test_state_from_another_setup_is_refused(tmp_path):
  data = DataConfig(source=corpus(tmp_path, [100] * 10), seq_len=16)
  state = pipeline.make_batches(data, BYTES, batch_size=4, seed=3, mesh=None).get_state()
  other = pipeline.make_batches(data, BYTES, batch_size=8, seed=3, mesh=None)
  with pytest.raises(DataError, match="this run has train.batch_size=8 but its checkpoint was saved with 4"):
    other.set_state(state)
  with pytest.raises(DataError, match="this run has train.seed=4 but its checkpoint was saved with 3"):
    pipeline.make_batches(data, BYTES, batch_size=4, seed=4, mesh=None).set_state(state)


def test_state_resumes_on_another_device_layout(tmp_path):
  """The state is keyed by global row: saved on a 2x4 mesh, it resumes on one device and on 1x2x4."""
  data = DataConfig(source=corpus(tmp_path, [40 + 9 * i for i in range(30)]), seq_len=16)
  uninterrupted = take(pipeline.make_batches(data, BYTES, batch_size=8, seed=2, mesh=None), 5)
  iterator = pipeline.make_batches(data, BYTES, batch_size=8, seed=2, mesh=mesh_of(2, 4, 1))
  take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  assert sorted(map(int, state["iterator"]["streams"])) == list(range(8))
  for mesh in (None, mesh_of(1, 2, 4)):
    resumed = pipeline.make_batches(data, BYTES, batch_size=8, seed=2, mesh=mesh)
    resumed.set_state(state)
    assert_same(take(resumed, 2), uninterrupted[3:])


def test_state_with_another_seq_len_names_the_setting(tmp_path):
  data = DataConfig(source=corpus(tmp_path, [100] * 10), seq_len=16)
  state = pipeline.make_batches(data, BYTES, batch_size=4, seed=3, mesh=None).get_state()
  longer = pipeline.make_batches(dataclasses.replace(data, seq_len=32), BYTES, batch_size=4, seed=3, mesh=None)
  with pytest.raises(DataError, match=r"this run has data.seq_len=32 but its checkpoint was saved with 16; resume"):
    longer.set_state(state)


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 8, 1), (1, 2, 4)])
def test_global_arrays_on_a_mesh_equal_the_host_batch(tmp_path, shape):
  data = DataConfig(source=corpus(tmp_path, [40 + 9 * i for i in range(30)]), seq_len=16)
  host = take(pipeline.make_batches(data, BYTES, batch_size=16, seed=0, mesh=None), 3)
  mesh = mesh_of(*shape)
  iterator = pipeline.make_batches(data, BYTES, batch_size=16, seed=0, mesh=mesh)
  batch = next(iterator)
  assert all(isinstance(v, jax.Array) and v.shape == (16, 16) for v in batch.values())
  assert batch["inputs"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  assert batch["loss_mask"].dtype == np.float32
  assert_same([{k: np.asarray(v) for k, v in batch.items()}] + take(iterator, 2), host)


def test_batch_must_divide_over_data_and_fsdp(tmp_path):
  data = DataConfig(source=corpus(tmp_path, [100] * 10), seq_len=16)
  with pytest.raises(DataError, match="batch size 6 is not divisible by mesh data x fsdp = 4"):
    pipeline.make_batches(data, BYTES, batch_size=6, seed=0, mesh=mesh_of(1, 4, 2))


def test_dataset_shorter_than_one_batch(tmp_path, caplog):
  source = corpus(tmp_path, [30, 40])  # 72 tokens with eos
  data = DataConfig(source=source, eval_source=source, seq_len=16)
  with pytest.raises(DataError, match=r"holds 72 tokens, fewer than one batch of 128 .*lower train.batch_size"):
    pipeline.make_batches(data, BYTES, batch_size=8, seed=0, mesh=None)
  with caplog.at_level(logging.WARNING):
    batches = take(pipeline.make_batches(data, BYTES, batch_size=8, seed=0, mesh=None, split="eval"), 1)
  assert "holds 72 tokens, fewer than one batch of 128" in caplog.text
  assert batches[0]["inputs"].shape == (8, 16)  # evaluation still runs, cycling the data


def test_bad_settings(tmp_path):
  data = DataConfig(source=corpus(tmp_path, [100] * 10), seq_len=16)
  with pytest.raises(DataError, match="data.prefetch=-1"):
    pipeline.make_batches(dataclasses.replace(data, prefetch=-1), BYTES, batch_size=4, seed=0, mesh=None)
  with pytest.raises(DataError, match="split 'test': expected train or eval"):
    pipeline.make_batches(data, BYTES, batch_size=4, seed=0, mesh=None, split="test")
  with pytest.raises(DataError, match=r"matches no file"):
    pipeline.make_batches(dataclasses.replace(data, source=f"text:{tmp_path}/none/*"), BYTES, batch_size=4, seed=0, mesh=None)


def test_tfds_tiny_shakespeare_end_to_end(tmp_path, shared_data):
  input_txt = shared_data / "tiny_shakespeare" / "input.txt"
  tfds_source.prepare("tiny_shakespeare", str(input_txt), str(tmp_path))
  text = input_txt.read_text(encoding="utf-8")
  data = DataConfig(source="tfds:tiny_shakespeare", tfds_data_dir=str(tmp_path), seq_len=64)
  train = next(pipeline.make_batches(data, BYTES, batch_size=8, seed=0, mesh=None))
  evaluation = next(pipeline.make_batches(data, BYTES, batch_size=8, seed=0, mesh=None, split="eval"))
  for row in train["inputs"]:
    assert BYTES.decode(row) in text[:1_003_854]
  assert BYTES.decode(evaluation["inputs"][0]) == text[1_003_854:1_003_854 + 64]


WORKER_SCRIPT = """
import json
from llm_jax import sharding
from llm_jax.config import DataConfig
from llm_jax.data import pipeline, tokenizer

# No `if __name__ == "__main__":` guard and no absl: the library must cope with both.
data = DataConfig(source={source!r}, seq_len=24, worker_count=2)
iterator = pipeline.make_batches(data, tokenizer.ByteTokenizer(), batch_size=4, seed=3, mesh=None)
batches = [next(iterator) for _ in range(3)]
state = json.loads(json.dumps(iterator.get_state()))
batches += [next(iterator) for _ in range(2)]
resumed = pipeline.make_batches(data, tokenizer.ByteTokenizer(), batch_size=4, seed=3, mesh=None)
resumed.set_state(state)
again = [next(resumed) for _ in range(2)]
print(json.dumps({{"batches": [b["inputs"].tolist() for b in batches], "again": [b["inputs"].tolist() for b in again],
                  "segments": [b["segment_ids"].tolist() for b in batches]}}))
"""


@pytest.mark.slow
def test_worker_processes_build_the_same_batches(tmp_path):
  source = corpus(tmp_path / "data", [10 + 17 * i for i in range(25)])
  script = tmp_path / "unguarded.py"
  script.write_text(WORKER_SCRIPT.format(source=source))
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  data = DataConfig(source=source, seq_len=24)
  expected = take(pipeline.make_batches(data, BYTES, batch_size=4, seed=3, mesh=None), 5)
  assert out["batches"] == [b["inputs"].tolist() for b in expected]
  assert out["segments"] == [b["segment_ids"].tolist() for b in expected]
  assert out["again"] == out["batches"][3:]


DISTRIBUTED_SCRIPT = """
import json
import jax
import numpy as np
from jax.experimental import multihost_utils
from llm_jax import distributed
from llm_jax.config import DataConfig, MeshConfig
from llm_jax.data import pipeline, tokenizer

distributed.initialize(MeshConfig())
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
data = DataConfig(source={source!r}, seq_len=16)
iterator = pipeline.make_batches(data, tokenizer.ByteTokenizer(), batch_size=8, seed=5, mesh=mesh)
batches = []
for _ in range(3):
  batch = next(iterator)
  local = {{str(s.index[0].start): np.asarray(s.data).tolist() for s in batch["inputs"].addressable_shards}}
  full = {{k: multihost_utils.process_allgather(v, tiled=True).tolist() for k, v in batch.items()}}
  batches.append({{"local": local, "full": full}})
print(json.dumps({{"process": jax.process_index(), "local_devices": jax.local_device_count(),
                  "rows": iterator.rows, "batches": batches}}))
"""


@pytest.mark.slow
def test_two_processes_build_disjoint_shards_of_the_single_process_batch(tmp_path):
  source = corpus(tmp_path, [40 + 9 * i for i in range(30)])
  outputs = run_processes(DISTRIBUTED_SCRIPT.format(source=source), num_processes=2, devices_per_process=4)
  results = sorted((json.loads(o.strip().splitlines()[-1]) for o in outputs), key=lambda r: r["process"])
  assert [r["local_devices"] for r in results] == [4, 4]
  assert [r["rows"] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # disjoint, covering
  data = DataConfig(source=source, seq_len=16)
  single = take(pipeline.make_batches(data, BYTES, batch_size=8, seed=5, mesh=mesh_of(2, 4, 1)), 3)
  for k, want in enumerate(single):
    for result in results:
      assert {key: np.array(v) for key, v in result["batches"][k]["full"].items()}.keys() == set(KEYS)
      for key in KEYS:
        np.testing.assert_array_equal(np.array(result["batches"][k]["full"][key]), want[key])
    rows = {}
    for result in results:
      for start, shard in result["batches"][k]["local"].items():
        rows.update({int(start) + i: row for i, row in enumerate(shard)})
    assert sorted(rows) == list(range(8))  # the processes' devices hold every row, each once
    assert [rows[r] for r in range(8)] == want["inputs"].tolist()
    assert set(results[0]["batches"][k]["local"]) == {"0", "1", "2", "3"}  # process 0 holds rows 0-3 only
