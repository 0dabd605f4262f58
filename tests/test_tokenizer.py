"""Tokenizers: exact round trips, the documented special ids, workdir copies, clear errors."""

import json
import pathlib
import pickle

import pytest
import sentencepiece as spm

from llm_jax import cli
from llm_jax.data import tokenizer as tok_lib
from llm_jax.data.tokenizer import TokenizerError

WHITESPACE = "  two leading\tand\ttabs \n\n\n   \r\nCRLF line\r\n\ttrailing   \n \u3000ideographic space\x0bvt\f\n"
MIXED = "naïve café — 東京 😀 العربية 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00 nul and 123456789 digits"


@pytest.fixture(scope="module")
def texts(shared_data) -> dict[str, str]:
  def read(path, n):  # newline="" keeps CRLF: the round trip must keep it too
    with open(shared_data / path, encoding="utf-8", newline="") as f:
      return f.read(n)
  return {
      "english": read("tiny_shakespeare/input.txt", 20_000),
      "python": pathlib.Path(tok_lib.__file__).read_text(encoding="utf-8"),
      "whitespace": WHITESPACE,
      "chinese": read("zh/hongloumeng.txt", 5_000) + read("zh/xiyouji.txt", 5_000),
      "mixed": MIXED,
  }


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, texts) -> pathlib.Path:
  """A small BPE model (vocab 1500) trained on a sample: Chinese mostly falls back to bytes."""
  corpus = tmp_path_factory.mktemp("corpus") / "sample.txt"
  corpus.write_text(texts["english"] + texts["python"] + texts["chinese"][:2000], encoding="utf-8")
  return tok_lib.train_sentencepiece([str(corpus)], 1500, str(tmp_path_factory.mktemp("sp") / "small.model"))


@pytest.fixture(scope="module")
def sp(sp_model) -> tok_lib.SentencePieceTokenizer:
  return tok_lib.load_tokenizer(str(sp_model))


@pytest.mark.parametrize("kind", ["english", "python", "whitespace", "chinese", "mixed"])
def test_round_trip_is_exact(kind, texts, sp):
  text = texts[kind]
  for tokenizer in (sp, tok_lib.ByteTokenizer()):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text, (tokenizer, kind)
    assert min(ids) >= tok_lib.NUM_SPECIALS and max(ids) < tokenizer.vocab_size  # no specials, no unk
    assert [a.tolist() for a in tokenizer.encode_batch([text, text[:100]])] == [ids, tokenizer.encode(text[:100])]


def test_sentencepiece_compresses_english_but_not_to_unk(texts, sp):
  ids = sp.encode(texts["english"])
  assert len(ids) < len(texts["english"]) / 2  # real merges, not bytes
  assert tok_lib.UNK_ID not in ids


def test_special_ids_are_the_documented_ones(sp):
  for tokenizer in (sp, tok_lib.ByteTokenizer()):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  raw = spm.SentencePieceProcessor(model_proto=sp._proto)
  assert [raw.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
  assert sp.vocab_size == 1500


def test_byte_tokenizer_ids():
  byte = tok_lib.ByteTokenizer()
  assert byte.vocab_size == 260
  assert byte.encode("A\n") == [65 + 4, 10 + 4]
  assert byte.encode("é") == [0xC3 + 4, 0xA9 + 4]
  assert byte.encode("") == []
  assert byte.decode([1, 65 + 4, 2, 0, 3, 66 + 4, 260, 9999]) == "AB"  # specials and out-of-vocab dropped
  assert byte.decode([0xC3 + 4]) == "\ufffd"  # half a character: replaced, not an exception


def test_decode_drops_specials_and_ids_past_the_vocab(sp):
  ids = sp.encode("Hello world")
  assert sp.decode([1] + ids + [2, 0, 3, sp.vocab_size, sp.vocab_size + 7]) == "Hello world"


def test_save_and_load_from_workdir(tmp_path, sp, texts):
  path = sp.save(tmp_path / "sp_run")
  assert path == tmp_path / "sp_run" / "tokenizer.model"
  assert json.loads((tmp_path / "sp_run" / "tokenizer.json").read_text()) == {"type": "sentencepiece", "model": "tokenizer.model"}
  loaded = tok_lib.load_from_workdir(tmp_path / "sp_run")
  assert loaded.encode(texts["english"][:3000]) == sp.encode(texts["english"][:3000])

  assert tok_lib.ByteTokenizer().save(tmp_path / "byte_run") == tmp_path / "byte_run" / "tokenizer.json"
  assert json.loads((tmp_path / "byte_run" / "tokenizer.json").read_text()) == {"type": "byte"}
  assert isinstance(tok_lib.load_from_workdir(tmp_path / "byte_run"), tok_lib.ByteTokenizer)

  # A byte run saved over a sentencepiece workdir is a byte run: tokenizer.json decides.
  tok_lib.ByteTokenizer().save(tmp_path / "sp_run")
  assert isinstance(tok_lib.load_from_workdir(tmp_path / "sp_run"), tok_lib.ByteTokenizer)


def test_load_from_workdir_without_tokenizer_fails(tmp_path):
  with pytest.raises(TokenizerError, match="holds no tokenizer.json or tokenizer.model"):
    tok_lib.load_from_workdir(tmp_path)


def test_sentencepiece_pickles(sp, texts):
  clone = pickle.loads(pickle.dumps(sp))
  assert clone.encode(texts["chinese"]) == sp.encode(texts["chinese"])


def test_check_vocab_names_both_sizes(sp):
  tok_lib.check_vocab(sp, 1500)
  tok_lib.check_vocab(tok_lib.ByteTokenizer(), 512)
  with pytest.raises(TokenizerError, match=r"model.vocab_size=1024 is smaller than .* 1500 .*set model.vocab_size=1500"):
    tok_lib.check_vocab(sp, 1024)
  with pytest.raises(TokenizerError, match="model.vocab_size=256 .* 260"):
    tok_lib.check_vocab(tok_lib.ByteTokenizer(), 256)


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(TokenizerError, match=r"no such file; train one with `llm-jax tokenizer train"):
    tok_lib.load_tokenizer(str(tmp_path / "missing.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(TokenizerError, match="is not a sentencepiece model"):
    tok_lib.load_tokenizer(str(junk))


def test_foreign_model_keeps_its_own_special_ids(tmp_path, texts):
  """A stock sentencepiece model (Llama 2's layout: unk 0, bos 1, eos 2, no pad) loads with its ids."""
  corpus = tmp_path / "c.txt"
  corpus.write_text(texts["english"], encoding="utf-8")
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "stock"), vocab_size=300,
                                 minloglevel=2)
  tokenizer = tok_lib.load_tokenizer(str(tmp_path / "stock.model"))
  assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
  assert tokenizer.pad_id == tokenizer.eos_id  # no pad piece: pad with eos
  ids = tokenizer.encode("To be, or not to be")
  assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == tokenizer.decode(ids)
  assert "be, or not to be" in tokenizer.decode(ids)
  tokenizer.save(tmp_path / "workdir")
  assert tok_lib.load_from_workdir(tmp_path / "workdir").eos_id == 2


def test_unigram_round_trips(tmp_path, texts):
  corpus = tmp_path / "c.txt"
  corpus.write_text(texts["english"][:8000] + texts["python"], encoding="utf-8")
  tokenizer = tok_lib.load_tokenizer(str(tok_lib.train_sentencepiece([str(corpus)], 600, str(tmp_path / "u"), "unigram")))
  for text in (texts["whitespace"], texts["chinese"][:500], texts["python"]):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_train_errors(tmp_path):
  with pytest.raises(TokenizerError, match=r"--input '.*nothing\*.txt' matches no file"):
    tok_lib.train_sentencepiece([str(tmp_path / "nothing*.txt")], 1000, str(tmp_path / "m.model"))
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(TokenizerError, match="every input file is empty"):
    tok_lib.train_sentencepiece([str(empty)], 1000, str(tmp_path / "m.model"))
  with pytest.raises(TokenizerError, match="--vocab-size 200 is too small"):
    tok_lib.train_sentencepiece([str(empty)], 200, str(tmp_path / "m.model"))
  small = tmp_path / "small.txt"
  small.write_text("just a few words\n" * 50)
  with pytest.raises(TokenizerError, match=r"cannot train --vocab-size 5000 .*Vocabulary size too high"):
    tok_lib.train_sentencepiece([str(small)], 5000, str(tmp_path / "m.model"))


def test_cli_trains_a_tokenizer(tmp_path, texts, capsys):
  corpus = tmp_path / "c.txt"
  corpus.write_text(texts["english"], encoding="utf-8")
  out = tmp_path / "out" / "tok.model"
  assert cli.main(["tokenizer", "train", "--input", str(tmp_path / "*.txt"), "--vocab-size", "400", "--out", str(out)]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {out}"
  assert tok_lib.load_tokenizer(str(out)).vocab_size == 400
  assert cli.main(["tokenizer", "train", "--input", str(tmp_path / "none*.txt"), "--vocab-size", "400", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("llm-jax: error: --input") and err.count("\n") == 1
