"""Token shards: `llm-jax data tokenize` (resumable, byte-identical reruns, cleaning) and tokens:DIR batches."""

import dataclasses
import json
import pathlib
import random

import numpy as np
import pytest
import tokenizers
from array_record.python.array_record_module import ArrayRecordReader

from llm_jax import cli
from llm_jax.config import DataConfig
from llm_jax.data import clean, pipeline, pretokenize, shards, sources
from llm_jax.data.tokenizer import ByteTokenizer, load_tokenizer
from llm_jax.errors import UserError

WORDS = "the of and a to in is was he for it with as his on be at by had are but from or".split() + [
    f"w{i}" for i in range(400)]


def write_corpus(directory: pathlib.Path, files: int = 3, docs: int = 30, seed: int = 0) -> str:
  """Files of blank-line separated documents of random words (some long enough to be cut into pieces)."""
  rng = random.Random(seed)
  directory.mkdir(parents=True, exist_ok=True)
  for f in range(files):
    docs_text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 400))) + rng.choice(".!?")
                 for _ in range(docs)]
    (directory / f"{f:02d}.txt").write_text("\n\n".join(docs_text) + "\n")
  return f"text:{directory}/*.txt"


def big_vocab_tokenizer(directory: pathlib.Path) -> str:
  """A Hugging Face word-level tokenizer.json of 70,000 ids (so its shards need uint32), built here."""
  vocab = {"<unk>": 0, "<|endoftext|>": 1, " ": 2}
  vocab.update({word: 69_997 + i for i, word in enumerate(WORDS[:3])})  # ids past 65,535
  vocab.update({word: 3 + i for i, word in enumerate(WORDS[3:])})
  vocab.update({p: 4000 + i for i, p in enumerate(".!?")})
  model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"\w+|\s|[^\w\s]"), "isolated")
  tok.add_special_tokens(["<|endoftext|>"])
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  return str(directory / "tokenizer.json")


def take(iterator, n):
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


def assert_same(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def tokenize(source, out, tokenizer="byte", chunk_chars=700, **kwargs):
  data = DataConfig(source=source, text_split="blank_line", chunk_chars=chunk_chars)
  return pretokenize.tokenize(data, tokenizer, out, **{"say": lambda _: None, **kwargs})


def files_of(directory: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def byte_shards(tmp_path_factory, corpus):
  out = tmp_path_factory.mktemp("shards") / "byte"
  tokenize(corpus, out)
  return out


@pytest.mark.parametrize("kind", ["byte", "hf70k"])
def test_batches_from_shards_equal_those_from_the_raw_source(tmp_path, corpus, byte_shards, kind):
  tok_spec = "byte" if kind == "byte" else big_vocab_tokenizer(tmp_path / "tok")
  out = byte_shards if kind == "byte" else tmp_path / "shards"
  if kind != "byte":
    tokenize(corpus, out, tok_spec)
  manifest = shards.read_manifest(out)
  assert manifest["dtype"] == ("<u2" if kind == "byte" else "<u4")
  tok = load_tokenizer(tok_spec)
  raw = DataConfig(source=corpus, text_split="blank_line", chunk_chars=700, seq_len=48)
  pieces = sources.load(dataclasses.replace(raw, eval_fraction=0.0), "train")
  assert manifest["totals"]["records"] == len(pieces)
  assert manifest["totals"]["documents"] == 90 and sum(ends for _, ends in pieces) == 90
  assert len(pieces) > 100  # long documents were cut into pieces, as the raw source cuts them
  tokens = DataConfig(source=f"tokens:{out}", seq_len=48)
  for split in ("train", "eval"):
    want = take(pipeline.make_batches(raw, tok, batch_size=8, seed=7, mesh=None, split=split), 30)
    got = take(pipeline.make_batches(tokens, tok, batch_size=8, seed=7, mesh=None, split=split), 30)
    assert_same(want, got)
  if kind != "byte":
    assert max(int(b["inputs"].max()) for b in got) >= 69_997  # ids past uint16 survived


def test_records_are_pieces_with_eos_at_document_ends(byte_shards, corpus):
  reader = ArrayRecordReader(str(byte_shards / "shard-00000.arrayrecord"))
  records = [np.frombuffer(r, "<u2") for r in reader.read_all()]
  first_file = sorted(pathlib.Path(corpus.removeprefix("text:").rsplit("/", 1)[0]).glob("*.txt"))[0]
  documents = first_file.read_text().rstrip("\n").split("\n\n")
  text, ends = "", []
  for ids in records:
    ends.append(ids[-1] == 2)
    text += ByteTokenizer().decode(ids) + ("\n\n" if ids[-1] == 2 else "")
  assert text == "\n\n".join(documents) + "\n\n"
  assert sum(ends) == len(documents) == 30


def test_two_workers_write_the_same_bytes_and_an_interrupted_run_resumes(tmp_path, corpus, byte_shards):
  tokenize(corpus, tmp_path / "two", workers=2)
  assert files_of(tmp_path / "two") == files_of(byte_shards)

  class Stop(Exception):
    pass

  def stop_after_first(message):
    if "shard-00000" in message:
      raise Stop  # as a kill would, between shards
  with pytest.raises(Stop):
    pretokenize.tokenize(DataConfig(source=corpus, text_split="blank_line", chunk_chars=700), "byte",
                         tmp_path / "cut", say=stop_after_first)
  cut = tmp_path / "cut"
  assert not (cut / "manifest.json").exists() and (cut / ".progress" / "00000.json").is_file()
  (cut / "shard-00001.arrayrecord.tmp").write_bytes(b"half a shard")  # killed while writing the next one
  first = (cut / "shard-00000.arrayrecord").stat().st_mtime_ns
  with pytest.raises(UserError, match="unfinished tokenize run: rerun the same llm-jax data tokenize command"):
    shards.TokenShards("tokens:cut", str(cut))
  said = []
  tokenize(corpus, cut, say=said.append)
  assert said[0] == "llm-jax: resuming: 1 of 3 shards are done"
  assert (cut / "shard-00000.arrayrecord").stat().st_mtime_ns == first  # not written again
  assert files_of(cut) == files_of(byte_shards)
  said.clear()
  tokenize(corpus, cut, say=said.append)
  assert said == [f"llm-jax: {cut} is complete (3 shards); nothing to do"]


def test_bad_shards_and_settings_fail_in_one_line(tmp_path, corpus, byte_shards):
  tok_json = big_vocab_tokenizer(tmp_path / "tok")
  data = DataConfig(source=f"tokens:{byte_shards}", seq_len=48)
  with pytest.raises(UserError) as error:
    pipeline.make_batches(data, load_tokenizer(tok_json), batch_size=8, seed=0, mesh=None)
  assert str(error.value).startswith(f"tokens:{byte_shards} was tokenized with byte (vocab 260, sha256:")
  assert "set data.tokenizer=byte or tokenize the source again" in str(error.value) and "\n" not in str(error.value)
  broken = tmp_path / "broken"
  broken.mkdir()
  for name, content in files_of(byte_shards).items():
    if name != "shard-00001.arrayrecord":
      (broken / name).write_bytes(content)
  with pytest.raises(UserError, match=r"shard shard-00001.arrayrecord is missing; restore it, or rerun"):
    sources.load(DataConfig(source=f"tokens:{broken}"), "train")
  with pytest.raises(UserError, match=r"has no manifest.json; write it with llm-jax data tokenize --out"):
    sources.load(DataConfig(source=f"tokens:{tmp_path}/tok"), "train")
  with pytest.raises(UserError, match=r"holds shards with other settings \(chunk_chars: 700, now 900\)"):
    tokenize(corpus, byte_shards, chunk_chars=900)
  with pytest.raises(UserError, match=r"--out .* is not empty and holds no tokenize run"):
    tokenize(corpus, tmp_path / "tok")
  with pytest.raises(UserError, match=r"llm-jax data tokenize reads documents \(text:, jsonl:, tfds: or hf:"):
    tokenize(f"tokens:{byte_shards}", tmp_path / "again")


# ----------------------------------------------------------------------------- cleaning


def decoded_documents(directory: pathlib.Path) -> list[str]:
  docs, text = [], ""
  for name in sorted(p.name for p in directory.glob("*.arrayrecord")):
    for record in ArrayRecordReader(str(directory / name)).read_all():
      ids = np.frombuffer(record, "<u2")
      text += ByteTokenizer().decode(ids)
      if ids[-1] == 2:
        docs, text = docs + [text], ""
  return docs


def test_each_cleaning_filter_is_applied_and_counted(tmp_path):
  rng = random.Random(1)
  long_doc = " ".join(rng.choice(WORDS) for _ in range(300))
  near = long_doc.split()
  near[150] = "changed"
  near = " ".join(near)  # one word of 300 differs: estimated Jaccard about 0.97
  other = " ".join(rng.choice(WORDS) for _ in range(300))
  documents = [
      "Cafe\u0301 au lait, s'il vous plai\u0302t.",  # decomposed accents: NFC composes them
      "The \ufb01sh and the dog!",  # the fi ligature: NFKC only
      "bell\x07 and nul\x00 removed; tab\tand\r\nline breaks kept",
      "tiny",
      "x" * 200,
      long_doc, near, other, long_doc,
      "The cat, and the dog!",  # punctuation and stop words stay
  ]
  source = tmp_path / "docs.jsonl"
  source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
  options = clean.CleanOptions(min_chars=5, max_chars=150, near_threshold=0.8)
  data = DataConfig(source=f"jsonl:{source}", chunk_chars=100_000)
  manifest = pretokenize.tokenize(data, "byte", tmp_path / "nfc", options=options, say=lambda _: None)
  assert manifest["totals"]["filtered"] == {"normalized": 1, "control": 1, "too_short": 1, "too_long": 5,
                                            "exact_duplicates": 0, "near_duplicates": 0}
  options = dataclasses.replace(options, max_chars=0, normal_form="NFKC")
  manifest = pretokenize.tokenize(data, "byte", tmp_path / "nfkc", options=options, say=lambda _: None)
  assert manifest["totals"]["filtered"] == {"normalized": 2, "control": 1, "too_short": 1, "too_long": 0,
                                            "exact_duplicates": 1, "near_duplicates": 1}
  assert manifest["shards"][0]["filtered"] == manifest["totals"]["filtered"]
  assert decoded_documents(tmp_path / "nfkc") == [
      "Café au lait, s'il vous plaît.", "The fish and the dog!",
      "bell and nul removed; tab\tand\r\nline breaks kept", "x" * 200, long_doc, other, "The cat, and the dog!"]
  loose = dataclasses.replace(options, near_threshold=0.99)  # the threshold decides: 0.97 is not near enough
  pretokenize.tokenize(data, "byte", tmp_path / "loose", options=loose, say=lambda _: None)
  assert near in decoded_documents(tmp_path / "loose")
  pretokenize.tokenize(data, "byte", tmp_path / "again", options=options, workers=2, say=lambda _: None)
  assert files_of(tmp_path / "again") == files_of(tmp_path / "nfkc")  # a cleaned corpus tokenizes the same


def test_near_duplicates_across_files_keep_the_first_in_source_order(tmp_path):
  rng = random.Random(2)
  base = " ".join(rng.choice(WORDS) for _ in range(200))
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "a.txt").write_text(base + "\n\nfirst file only\n")
  (tmp_path / "in" / "b.txt").write_text(base.replace(base.split()[100], "other", 1) + "\n\nsecond file\n")
  manifest = tokenize(f"text:{tmp_path}/in/*.txt", tmp_path / "out", chunk_chars=100_000,
                      options=clean.CleanOptions(), workers=2)
  assert [s["documents"] for s in manifest["shards"]] == [2, 1]
  assert [s["filtered"]["near_duplicates"] for s in manifest["shards"]] == [0, 1]
  assert decoded_documents(tmp_path / "out") == [base, "first file only", "second file"]


def test_clean_options_are_checked():
  for options, message in [(clean.CleanOptions(normal_form="NFD"), "expected NFC, NFKC or none"),
                           (clean.CleanOptions(min_chars=10, max_chars=5), "expected 0 <= min <= max"),
                           (clean.CleanOptions(near_threshold=1.5), "expected a Jaccard similarity")]:
    with pytest.raises(UserError, match=message):
      options.check()


def test_cli_prints_the_totals(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("one document\n")
  assert cli.main(["data", "tokenize", "--source", f"text:{tmp_path}/a.txt", "--tokenizer", "byte",
                   "--out", str(tmp_path / "out")]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"llm-jax: shard-00000.arrayrecord: 1 documents, 14 tokens ({tmp_path}/a.txt)"
  assert json.loads(lines[1]) == {"out": str(tmp_path / "out"), "records": 1, "documents": 1, "tokens": 14, "shards": 1}
