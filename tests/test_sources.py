"""Sources: local text and JSONL, offline TFDS tiny_shakespeare, pieces, held-out splits, bad input."""

import dataclasses
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

from llm_jax import cli
from llm_jax.config import DataConfig
from llm_jax.data import documents, sources, textfiles, tfds_source
from llm_jax.data.documents import DataError


def texts_of(docs) -> list[str]:
  return [docs[i][0] for i in range(len(docs))]


@pytest.fixture(scope="module")
def shakespeare(shared_data) -> str:
  with open(shared_data / "tiny_shakespeare" / "input.txt", encoding="utf-8", newline="") as f:
    return f.read()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, shared_data) -> pathlib.Path:
  """tiny_shakespeare prepared offline, as `llm-jax data prepare` does it."""
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds_source.prepare("tiny_shakespeare", str(shared_data / "tiny_shakespeare" / "input.txt"), str(data_dir))
  return data_dir


def write(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode("utf-8"))
  return path


# ----------------------------------------------------------------------------- TFDS


def test_environment_has_no_tensorflow():
  assert importlib.util.find_spec("tensorflow") is None  # what the offline path must work without


def test_prepare_builds_the_real_tfds_splits(tfds_dir, shakespeare):
  import tensorflow_datasets as tfds
  n = len(shakespeare)
  train_end = int(n * 0.9)  # TFDS's tiny_shakespeare builder: 90% train, then half of the rest each
  validation_end = train_end + int((n - train_end) * 0.5)
  expected = {"train": shakespeare[:train_end], "validation": shakespeare[train_end:validation_end],
              "test": shakespeare[validation_end:]}
  assert [len(t) for t in expected.values()] == [1_003_854, 55_770, 55_770]
  for split, text in expected.items():
    source = tfds.data_source("tiny_shakespeare", split=split, data_dir=str(tfds_dir), download=False)
    assert len(source) == 1  # TFDS stores each split as one example
    assert source[0]["text"].decode("utf-8") == text
  info = json.loads((tfds_dir / "tiny_shakespeare" / "1.0.0" / "dataset_info.json").read_text())
  assert info["fileFormat"] == "array_record" and info["version"] == "1.0.0"
  assert {s["name"]: s["shardLengths"] for s in info["splits"]} == {s: ["1"] for s in expected}


def test_prepare_is_idempotent_and_the_cli_prints_the_dataset_dir(tfds_dir, shared_data, capsys):
  assert cli.main(["data", "prepare", "tiny_shakespeare", "--from-file",
                   str(shared_data / "tiny_shakespeare" / "input.txt"), "--data-dir", str(tfds_dir)]) == 0
  assert capsys.readouterr().out.strip().endswith(str(tfds_dir / "tiny_shakespeare" / "1.0.0"))


def test_tfds_source_cuts_the_giant_example_into_pieces(tfds_dir, shakespeare):
  data = DataConfig(source="tfds:tiny_shakespeare", tfds_data_dir=str(tfds_dir), seq_len=64)
  train = sources.load(data, "train")
  pieces = [train[i] for i in range(len(train))]
  assert "".join(t for t, _ in pieces) == shakespeare[:1_003_854]  # nothing lost, in order
  assert len(pieces) > 400 and max(len(t) for t, _ in pieces) <= 32 * 64
  assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]  # one document, one eos
  assert all(t.endswith("\n") for t, _ in pieces[:-1])  # cut at line breaks
  evaluation = sources.load(data, "eval")  # the dataset's own validation split, nothing held out
  assert "".join(texts_of(evaluation)) == shakespeare[1_003_854:1_003_854 + 55_770]


def test_tfds_explicit_split_and_slices(tfds_dir, shakespeare):
  data = DataConfig(source="tfds:tiny_shakespeare:test", tfds_data_dir=str(tfds_dir), chunk_chars=100_000)
  assert texts_of(sources.load(data, "train")) == [shakespeare[-55_770:]]
  data = dataclasses.replace(data, source="tfds:tiny_shakespeare:validation+test")
  assert "".join(texts_of(sources.load(data, "train"))) == shakespeare[1_003_854:]


def test_tfds_errors(tfds_dir):
  def load(source, **kw):
    return sources.load(DataConfig(source=source, tfds_data_dir=str(tfds_dir), **kw), "train")

  with pytest.raises(DataError, match=r"tfds:tiny_shakespeare:dev: no split 'dev'.*\['test', 'train', 'validation'\]"):
    load("tfds:tiny_shakespeare:dev")
  with pytest.raises(DataError, match=r"has no feature 'content' \(it has \['text'\]\); set data.text_field"):
    load("tfds:tiny_shakespeare", text_field="content")
  with pytest.raises(DataError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
    load("tfds:no_such_dataset_xyz")
  with pytest.raises(DataError, match=r"expected tfds:NAME\[:SPLIT\], text:GLOB, jsonl:GLOB, hf:PATH_OR_NAME"):
    load("s3:some/dataset")


def test_missing_tfds_dataset_offline_names_the_prepare_command(tmp_path):
  if documents.online("raw.githubusercontent.com"):
    pytest.skip("this machine is online: TFDS would download the dataset instead")
  with pytest.raises(DataError) as error:
    sources.load(DataConfig(source="tfds:tiny_shakespeare", tfds_data_dir=str(tmp_path)), "train")
  message = str(error.value)
  assert "\n" not in message
  assert f"llm-jax data prepare tiny_shakespeare --from-file input.txt --data-dir {tmp_path}" in message


def test_tfrecord_dataset_reads_by_index_without_tensorflow(tfds_dir, tmp_path):
  """The prepared array_record dataset rewritten as real tfrecord files (tensorboardX writes the format, CRCs
  included), with its dataset_info saying so: it reads the same pieces, at random, with no TensorFlow."""
  from array_record.python.array_record_module import ArrayRecordReader
  from tensorboardX.record_writer import RecordWriter
  copy = tmp_path / "tfds"
  shutil.copytree(tfds_dir, copy)
  folder = copy / "tiny_shakespeare" / "1.0.0"
  for path in folder.glob("*.array_record-*"):
    writer = RecordWriter(str(path).replace(".array_record-", ".tfrecord-"))
    for record in ArrayRecordReader(str(path)).read_all():
      writer.write(record)
    writer.close()
    path.unlink()
  info = folder / "dataset_info.json"
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  for split in ("train", "validation+test"):
    want = sources.load(DataConfig(source=f"tfds:tiny_shakespeare:{split}", tfds_data_dir=str(tfds_dir)), "train")
    got = sources.load(DataConfig(source=f"tfds:tiny_shakespeare:{split}", tfds_data_dir=str(copy)), "train")
    assert isinstance(got._source, tfds_source.TfrecordExamples)
    order = list(reversed(range(len(want))))
    assert [got[i] for i in order] == [want[i] for i in order] and len(got) == len(want) > 10


def test_prepare_errors(tmp_path):
  with pytest.raises(DataError, match="knows tiny_shakespeare, not 'mnist'"):
    tfds_source.prepare("mnist", str(tmp_path / "x"), str(tmp_path))
  with pytest.raises(DataError, match=r"--from-file .*input.txt: no such file"):
    tfds_source.prepare("tiny_shakespeare", str(tmp_path / "input.txt"), str(tmp_path))


# ----------------------------------------------------------------------------- local files


def test_text_one_document_per_file_in_sorted_order(tmp_path):
  write(tmp_path / "b.txt", "second\r\nfile\n")
  write(tmp_path / "a.txt", "first file")
  write(tmp_path / "sub" / "c.txt", "third")
  write(tmp_path / "empty.txt", " \n")
  docs = sources.load(DataConfig(source=f"text:{tmp_path}/**/*.txt", eval_fraction=0.0), "train")
  assert [docs[i] for i in range(len(docs))] == [("first file", True), ("second\r\nfile\n", True), ("third", True)]


def test_text_blank_line_blocks(tmp_path):
  write(tmp_path / "a.txt", "\n one\n two\n \n = Head = \r\n\r\n\t\n\nlast\nblock\n\n")
  docs = sources.load(DataConfig(source=f"text:{tmp_path}/a.txt", text_split="blank_line", eval_fraction=0.0), "train")
  assert texts_of(docs) == [" one\n two", " = Head = ", "last\nblock"]


def test_jsonl_documents(tmp_path):
  write(tmp_path / "d.jsonl", '{"text": "a\\nb", "id": 1}\n\n{"text": "c"}\n{"text": ""}\n')
  write(tmp_path / "e.jsonl", '{"body": "other field"}\n')
  docs = sources.load(DataConfig(source=f"jsonl:{tmp_path}/d.jsonl", eval_fraction=0.0), "train")
  assert texts_of(docs) == ["a\nb", "c"]
  docs = sources.load(DataConfig(source=f"jsonl:{tmp_path}/e.jsonl", text_field="body", eval_fraction=0.0), "train")
  assert texts_of(docs) == ["other field"]


def test_jsonl_errors_name_the_line(tmp_path):
  write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": 3}\n')
  with pytest.raises(DataError, match=r"d.jsonl:2: no string field 'text' \(found \['text'\]\); set data.text_field"):
    sources.load(DataConfig(source=f"jsonl:{tmp_path}/d.jsonl"), "train")
  write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": "cut\n')
  with pytest.raises(DataError, match=r"d.jsonl:2: not JSON \(Unterminated string"):
    sources.load(DataConfig(source=f"jsonl:{tmp_path}/d.jsonl"), "train")


def test_undecodable_bytes_report_file_and_offset(tmp_path):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("good text, then ".encode() + "café".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin1.txt: invalid UTF-8 at byte offset 19; convert it, e.g. iconv"):
    sources.load(DataConfig(source=f"text:{bad}"), "train")


def test_missing_files_and_empty_data(tmp_path):
  with pytest.raises(DataError, match=rf"text:{tmp_path}/nope/\*.txt matches no file; check the path"):
    sources.load(DataConfig(source=f"text:{tmp_path}/nope/*.txt"), "train")
  (tmp_path / "dir.txt").mkdir()
  with pytest.raises(DataError, match="only directories match"):
    sources.load(DataConfig(source=f"text:{tmp_path}/dir.txt"), "train")
  write(tmp_path / "blank.jsonl", "\n\n")
  with pytest.raises(DataError, match=r"jsonl:.*blank.jsonl holds no text; point data.source at a non-empty dataset"):
    sources.load(DataConfig(source=f"jsonl:{tmp_path}/blank.jsonl"), "train")
  with pytest.raises(DataError, match="data.chunk_chars=-1"):
    sources.load(DataConfig(source=f"text:{tmp_path}/*.jsonl", chunk_chars=-1), "train")


# ----------------------------------------------------------------------------- pieces and splits


@pytest.mark.parametrize("text", ["a\n" * 50, "x" * 95, "line one\nline two is longer\n" * 7 + "tail", "", "short"])
def test_chunk_spans_tile_the_text(text):
  spans = textfiles.chunk_spans(text, 16)
  assert "".join(text[a:b] for a, b in spans) == text
  assert all(0 < b - a <= 16 for a, b in spans)
  assert all(text[b - 1] == "\n" for a, b in spans[:-1] if "\n" in text[a + 8:a + 16])


def test_held_out_is_evenly_spaced_and_deterministic():
  assert sources.held_out(10, 0.2).tolist() == [2, 7]
  assert sources.held_out(3, 0.1).tolist() == [1]  # at least one piece
  assert sources.held_out(2, 0.9).tolist() == [1]  # at least one piece stays for training
  assert sources.held_out(1, 0.5).tolist() == [] and sources.held_out(10, 0.0).tolist() == []


def test_local_eval_split_is_held_out_of_train(tmp_path):
  for i in range(20):
    write(tmp_path / f"{i:02d}.txt", f"document {i}\n" * 3)
  data = DataConfig(source=f"text:{tmp_path}/*.txt", eval_fraction=0.1)
  train, evaluation = texts_of(sources.load(data, "train")), texts_of(sources.load(data, "eval"))
  assert evaluation == ["document 5\n" * 3, "document 15\n" * 3]
  assert sorted(train + evaluation) == sorted(f"document {i}\n" * 3 for i in range(20))
  assert texts_of(sources.load(data, "eval")) == evaluation  # deterministic

  write(tmp_path / "eval" / "held.txt", "separate eval text")
  data = dataclasses.replace(data, eval_source=f"text:{tmp_path}/eval/*.txt")
  assert texts_of(sources.load(data, "eval")) == ["separate eval text"]
  assert len(sources.load(data, "train")) == 20  # nothing held out when eval_source is set


def test_no_eval_data_is_a_clear_error(tmp_path):
  write(tmp_path / "a.txt", "only one short piece")
  with pytest.raises(DataError, match=r"has no evaluation data \(1 piece\(s\), data.eval_fraction=0.1\); set data.eval_source"):
    sources.load(DataConfig(source=f"text:{tmp_path}/a.txt"), "eval")
  assert texts_of(sources.load(DataConfig(source=f"text:{tmp_path}/a.txt"), "train")) == ["only one short piece"]


def test_giant_local_file_is_held_out_by_pieces(shared_data, shakespeare):
  data = DataConfig(source=f"text:{shared_data}/tiny_shakespeare/input.txt", seq_len=256)
  train, evaluation = sources.load(data, "train"), sources.load(data, "eval")
  assert len(evaluation) == round(0.1 * (len(train) + len(evaluation)))
  all_pieces = sources.load(dataclasses.replace(data, eval_fraction=0.0), "train")
  assert "".join(texts_of(all_pieces)) == shakespeare
  held = set(sources.held_out(len(all_pieces), 0.1).tolist())
  assert texts_of(evaluation) == [all_pieces[i][0] for i in sorted(held)]
  assert texts_of(train) == [all_pieces[i][0] for i in range(len(all_pieces)) if i not in held]
  assert np.mean([len(t) for t in texts_of(train)]) > 0.75 * 32 * 256


def test_undecodable_tfds_text_reports_example_and_offset():
  examples = documents.Examples("tfds:x:train", [{"text": b"fine"}, {"text": b"ok \xff tail"}], "text", None)
  assert examples[0] == ("fine", True)
  with pytest.raises(DataError, match=r"tfds:x:train example 1: invalid UTF-8 at byte offset 3"):
    examples[1]
