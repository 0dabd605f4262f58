"""Tokenizers: sentencepiece models trained to round-trip any text, a zero-setup byte tokenizer, and
Hugging Face tokenizer.json files (`hf_tokenizer.py`, which keeps each model's own specials).

Both use the same special ids (a foreign sentencepiece model, such as Llama 2's with unk 0,
bos 1, eos 2 and no pad, keeps its own, read from the model; callers use `tokenizer.eos_id`):

  id 0  pad   (never emitted by the packer, whose rows are always full; there for padded batches)
  id 1  bos   (not added by `encode`; available to callers that want it)
  id 2  eos   (appended to every document by the data pipeline)
  id 3  unk   (never produced: both tokenizers fall back to bytes)

The byte tokenizer maps byte b of the UTF-8 encoding to id b + 4 (vocab_size 260). A
sentencepiece model trained by `train_sentencepiece` keeps the text exactly: identity
normalization, no whitespace collapsing, no dummy prefix, newline as a piece of its own, and byte
fallback for any character outside its vocabulary; digits are split so numbers stay regular.

`encode` never adds bos/eos; `decode` drops specials (and ids beyond the vocabulary, which a
model whose embedding table is padded past the tokenizer can sample).

A workdir's tokenizer.json says which tokenizer it holds: llm-jax's own is {"type": "byte"} or
{"type": "sentencepiece", "model": "tokenizer.model"}; a Hugging Face one (its "model" is an object)
is that tokenizer itself, with its tokenizer_config.json beside it.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
from typing import Protocol, Sequence

import numpy as np
import sentencepiece as spm

from llm_jax.errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NUM_SPECIALS = 4
BYTE_VOCAB_SIZE = 256 + NUM_SPECIALS

_JSON_NAME = "tokenizer.json"  # which tokenizer a workdir holds
_MODEL_NAME = "tokenizer.model"  # the sentencepiece model, copied beside it


class TokenizerError(UserError):
  """A tokenizer that cannot be found, loaded, trained or used with this model."""


class Tokenizer(Protocol):
  """What the pipeline, trainer and sampler need from a tokenizer."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  unk_id: int
  chat_template: str | None  # a Hugging Face tokenizer's jinja chat template; None for the others

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos or eos."""

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of many texts at once, as int32 arrays (the pipeline's fast path)."""

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, with specials and out-of-vocabulary ids dropped."""

  def save(self, workdir: str | pathlib.Path) -> pathlib.Path:
    """Copies the tokenizer into `workdir` so a run is self-contained; returns the file written."""


class _Specials:
  vocab_size: int
  pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
  chat_template: str | None = None


class ByteTokenizer(_Specials):
  """UTF-8 bytes shifted past the specials: no training, no file, any text."""

  vocab_size = BYTE_VOCAB_SIZE

  def encode(self, text: str) -> list[int]:
    return self._encode(text).tolist()

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self._encode(text) for text in texts]

  def decode(self, ids: Sequence[int]) -> str:
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids_N = ids_N[(ids_N >= NUM_SPECIALS) & (ids_N < BYTE_VOCAB_SIZE)]
    # A sampled sequence can cut a character in half; show that as U+FFFD rather than fail.
    return (ids_N - NUM_SPECIALS).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def save(self, workdir: str | pathlib.Path) -> pathlib.Path:
    return _write_json(workdir, {"type": "byte"})

  @staticmethod
  def _encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + NUM_SPECIALS

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class SentencePieceTokenizer(_Specials):
  """A sentencepiece model held as bytes, so it pickles into data workers and saves anywhere."""

  def __init__(self, model_proto: bytes, origin: str):
    self._proto = model_proto
    self._origin = origin
    self._sp = _processor(model_proto, origin)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id, self.unk_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()
    # Foreign models (Llama 2's) may have no pad piece: pad with eos, which masks hide anyway.
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    if self.eos_id < 0:
      raise TokenizerError(f"{origin} has no eos piece, which marks document ends; retrain it with "
                           "`llm-jax tokenizer train`")

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts))]

  def decode(self, ids: Sequence[int]) -> str:
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = (ids_N >= 0) & (ids_N < self.vocab_size) & ~np.isin(ids_N, [self.pad_id, self.bos_id, self.eos_id, self.unk_id])
    return self._sp.decode(ids_N[keep].tolist())

  def save(self, workdir: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(workdir) / _MODEL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(self._proto)
    _write_json(workdir, {"type": "sentencepiece", "model": _MODEL_NAME})
    return path

  def __getstate__(self) -> dict:
    return {"model_proto": self._proto, "origin": self._origin}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["model_proto"], state["origin"])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self._origin!r}, vocab_size={self.vocab_size})"


def _processor(model_proto: bytes, origin: str) -> spm.SentencePieceProcessor:
  sp = spm.SentencePieceProcessor()
  try:
    sp.load_from_serialized_proto(model_proto)
  except (RuntimeError, OSError):
    raise TokenizerError(f"{origin} is not a sentencepiece model; pass a .model file written by "
                         "`llm-jax tokenizer train`, a Hugging Face tokenizer.json, or data.tokenizer=byte") from None
  return sp


def _write_json(workdir: str | pathlib.Path, content: dict) -> pathlib.Path:
  path = pathlib.Path(workdir) / _JSON_NAME
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(content) + "\n")
  return path


def load_tokenizer(spec: str) -> Tokenizer:
  """`data.tokenizer`: "byte", a sentencepiece .model file, or a Hugging Face tokenizer.json or its folder.

  A folder is read as `load_from_workdir` reads one, so a converted model's folder or a run's workdir
  serves too. A tokenizer.json brings the transformers files beside it (see `hf_tokenizer.py`).
  """
  if spec == "byte":
    return ByteTokenizer()
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    return _load_folder(path, f"data.tokenizer={spec!r}")
  if not path.is_file():
    raise TokenizerError(
        f"data.tokenizer={spec!r}: no such file; train one with `llm-jax tokenizer train --input GLOB "
        f"--vocab-size N --out {spec}`, pass a Hugging Face tokenizer.json, or set data.tokenizer=byte")
  if path.suffix == ".json":
    return _load_json(path)
  return SentencePieceTokenizer(path.read_bytes(), str(path))


def _load_json(path: pathlib.Path) -> Tokenizer:
  """A tokenizer.json: llm-jax's note of which tokenizer a workdir holds, or a Hugging Face tokenizer."""
  from llm_jax.data import hf_tokenizer
  try:
    info = json.loads(path.read_bytes())
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise TokenizerError(f"{path} is not JSON; pass a Hugging Face tokenizer.json or a folder holding one") from None
  if hf_tokenizer.is_hf_json(info):
    return hf_tokenizer.HFTokenizer.from_folder(path.parent, path.name)
  kind = info.get("type") if isinstance(info, dict) else None
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    return load_tokenizer(str(path.parent / info.get("model", _MODEL_NAME)))
  raise TokenizerError(f"{path} is neither a Hugging Face tokenizer.json (no \"model\" object) nor llm-jax's "
                       f"(type {kind!r}, expected byte or sentencepiece); pass the tokenizer.json of a "
                       "transformers folder")


def _load_folder(folder: pathlib.Path, what: str) -> Tokenizer:
  if (folder / _JSON_NAME).is_file():
    return _load_json(folder / _JSON_NAME)
  if (folder / _MODEL_NAME).is_file():
    return load_tokenizer(str(folder / _MODEL_NAME))
  raise TokenizerError(f"{what}: {folder} holds no {_JSON_NAME} or {_MODEL_NAME}; pass a folder that holds a "
                       "tokenizer (a run's workdir, a converted model or a transformers folder)")


def load_from_workdir(workdir: str | pathlib.Path) -> Tokenizer:
  """The tokenizer a run saved into its workdir (see `Tokenizer.save`), or a converted model's.

  tokenizer.json decides when present (a byte run saved over a sentencepiece workdir is a byte run,
  and a Hugging Face tokenizer.json wins over the tokenizer.model that Mistral's folders also hold).
  """
  workdir = pathlib.Path(workdir)
  if not ((workdir / _JSON_NAME).is_file() or (workdir / _MODEL_NAME).is_file()):
    raise TokenizerError(f"{workdir} holds no {_JSON_NAME} or {_MODEL_NAME}; is it a llm-jax workdir?")
  return _load_folder(workdir, str(workdir))


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Fails before training when the model cannot embed every id the tokenizer emits (added tokens included)."""
  if model_vocab_size < tokenizer.vocab_size:
    raise TokenizerError(
        f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocabulary of "
        f"{tokenizer.vocab_size} ({tokenizer!r}); set model.vocab_size={tokenizer.vocab_size} or more")


def _expand(inputs: Sequence[str]) -> list[str]:
  files = []
  for pattern in inputs:
    matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not matches:
      raise TokenizerError(f"--input {pattern!r} matches no file; check the path or quote the glob")
    files += matches
  return files


def _check_out(out: str) -> None:
  """Refuses, before training, an --out that names a folder.

  Given DIR, sentencepiece would write DIR.model and DIR.vocab beside it, over any files of those names.
  """
  prefix = out[: -len(".model")] if out.endswith(".model") else out
  written = (pathlib.Path(out), pathlib.Path(prefix + ".model"), pathlib.Path(prefix + ".vocab"))
  if out.endswith(("/", os.sep)) or any(path.is_dir() for path in written):
    raise TokenizerError(f"--out {out} names a folder; pass the path of the .model file to write, "
                         f"e.g. {pathlib.Path(out) / 'tokenizer.model'}")
  parent = pathlib.Path(prefix).parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise TokenizerError(f"--out {out} cannot be written: {parent} is a file; pass a path under a folder")


def train_sentencepiece(inputs: list[str], vocab_size: int, out: str, model_type: str = "bpe") -> pathlib.Path:
  """Trains a sentencepiece model on the files `inputs` (globs) and writes `out` (.model added if absent).

  Lines are the training sentences (at most 2M of them, sampled); the settings make
  decode(encode(x)) == x for any UTF-8 text, and the specials take ids 0-3 as documented above.
  """
  if model_type not in ("bpe", "unigram"):
    raise TokenizerError(f"model type {model_type!r}: expected bpe or unigram")
  _check_out(out)
  minimum = NUM_SPECIALS + 256 + 1  # specials, the 256 byte-fallback pieces and the newline piece
  if vocab_size <= minimum:
    raise TokenizerError(f"--vocab-size {vocab_size} is too small: it must exceed {minimum} (specials and bytes)")
  files = _expand(inputs)
  if all(os.path.getsize(f) == 0 for f in files):
    raise TokenizerError(f"every input file is empty ({', '.join(files)}); train on some text")
  prefix = out[: -len(".model")] if out.endswith(".model") else out
  pathlib.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
  try:
    spm.SentencePieceTrainer.train(
        input=files, model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"], character_coverage=0.9995,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        input_sentence_size=2_000_000, shuffle_input_sentence=True, max_sentence_length=1 << 16,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:  # e.g. "... Vocabulary size too high (N). Please set it to a value <= M."
    reason = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]  # drop sentencepiece's source location
    chars = re.search(r"required_chars\. \d+ vs (\d+)", reason)
    if chars:  # CJK text: 99.95% character coverage needs one piece per common character
      reason = f"its common characters alone need {chars.group(1)} pieces; raise --vocab-size above that"
    raise TokenizerError(f"sentencepiece cannot train --vocab-size {vocab_size} on {', '.join(files)}: {reason}") from None
  return pathlib.Path(prefix + ".model")
