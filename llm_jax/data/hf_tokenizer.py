"""Hugging Face tokenizers: a `tokenizer.json` read through the `tokenizers` library, with its specials.

A transformers folder spreads one tokenizer over several files, all kept and written back as read:

  tokenizer.json           the vocabulary, merges, normalizer and added tokens (all the ids come from here)
  tokenizer_config.json    bos/eos/pad/unk token names, and the chat template in older folders
  special_tokens_map.json  the same token names (older folders); where both name one, this file wins, as in
                           transformers
  chat_template.jinja      the chat template, as transformers 4.47 and later write it (wins over the config's)

Conventions, chosen so that a converted model behaves as transformers does and the pipeline stays as it is:

- `encode` adds nothing: not the bos that a Llama 3 post-processor would prepend, nor an eos (the data
  pipeline appends eos itself). Added tokens written in the text (`<|im_start|>`) are recognised, as
  transformers does with add_special_tokens=False. Truncation and padding stored in tokenizer.json are
  switched off: a document must never be cut silently.
- `decode` drops only the framing ids (pad, bos, eos) and ids outside the vocabulary; every other token,
  chat markers included, is text the model produced and is shown.
- A tokenizer without a bos (Qwen2) begins with its eos, as GPT-2's `<|endoftext|>` serves both; without a
  pad it pads with eos; without an unk (byte-level BPE needs none) `unk_id` is -1.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Sequence

import numpy as np
import tokenizers

from llm_jax.data.tokenizer import TokenizerError

TOKENIZER_JSON = "tokenizer.json"
CONFIG_JSON = "tokenizer_config.json"
SPECIAL_MAP_JSON = "special_tokens_map.json"
TEMPLATE_JINJA = "chat_template.jinja"
FILES = (TOKENIZER_JSON, CONFIG_JSON, SPECIAL_MAP_JSON, TEMPLATE_JINJA)
ROLES = ("bos", "eos", "pad", "unk")
# When no file names an eos (a bare tokenizer.json), the first of these among the special added tokens is it.
_EOS_GUESSES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")


def is_hf_json(content: object) -> bool:
  """True for a `tokenizers` tokenizer.json; llm-jax's own tokenizer.json is {"type": ..., "model": "<file>"}."""
  return isinstance(content, dict) and isinstance(content.get("model"), dict)


def _read(path: pathlib.Path) -> str:
  """The text of `path`, line endings untouched (read_text would turn CRLF into LF, and save would change it)."""
  try:
    return path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise TokenizerError(f"{path} is not UTF-8 text (byte {e.start}); restore it from the model's original "
                         "folder") from None


def copy_files(source: str | pathlib.Path, dest: str | pathlib.Path) -> list[str]:
  """Copies a Hugging Face tokenizer's files from `source` into `dest` as they are; returns the names copied.

  Nothing is copied when `source`'s tokenizer.json is llm-jax's own (or absent): that file would not
  load in transformers.
  """
  source, dest = pathlib.Path(source), pathlib.Path(dest)
  try:
    if not is_hf_json(json.loads(_read(source / TOKENIZER_JSON))):
      return []
  except (OSError, json.JSONDecodeError):
    return []
  copied = [name for name in FILES if (source / name).is_file()]
  for name in copied:
    (dest / name).write_bytes((source / name).read_bytes())
  return copied


def _token_name(value: object) -> str | None:
  """A special token as the files spell it: a string, or an AddedToken dict with its "content"."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _parse(files: Mapping[str, str], name: str, origin: str) -> dict:
  if name not in files:
    return {}
  try:
    content = json.loads(files[name])
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{origin}: {name} is not JSON ({e.msg} at line {e.lineno}); restore it from the model's "
                         "original folder") from None
  if not isinstance(content, dict):
    raise TokenizerError(f"{origin}: {name} holds a {type(content).__name__}, not a JSON object; restore it from the "
                         "model's original folder")
  return content


def _chat_template(files: Mapping[str, str], config: Mapping) -> str | None:
  if TEMPLATE_JINJA in files:
    return files[TEMPLATE_JINJA]
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
  return template if isinstance(template, str) else None


class HFTokenizer:
  """A Hugging Face tokenizer: the `Tokenizer` interface of llm-jax plus `chat_template`.

  Held as the text of its files, so it pickles into data workers and saves byte for byte.
  """

  def __init__(self, files: Mapping[str, str], origin: str):
    self._files = dict(files)
    self._origin = origin
    try:
      self._tok = tokenizers.Tokenizer.from_str(files[TOKENIZER_JSON])
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise TokenizerError(f"{origin}: {TOKENIZER_JSON} cannot be read by the tokenizers library ({reason}); restore "
                           "it from the model's original folder") from None
    self._tok.no_truncation()
    self._tok.no_padding()
    config = _parse(files, CONFIG_JSON, origin)
    special_map = _parse(files, SPECIAL_MAP_JSON, origin)
    self.chat_template: str | None = _chat_template(files, config)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values(), default=-1) + 1  # added tokens may leave holes: the largest id counts
    self._names: dict[str, str] = {}  # role -> token, as the files name it (what save writes when they are absent)
    for role in ROLES:
      name = _token_name(special_map.get(f"{role}_token")) or _token_name(config.get(f"{role}_token"))
      if name is None:
        continue
      if name not in vocab:
        raise TokenizerError(f"{origin}: the {role} token {name!r} is not in {TOKENIZER_JSON}'s vocabulary; fix "
                             f"{role}_token in {CONFIG_JSON} or {SPECIAL_MAP_JSON}")
      self._names[role] = name
    if "eos" not in self._names:
      specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
      guess = next((name for name in _EOS_GUESSES if name in specials), None)
      if guess is None:
        raise TokenizerError(f"{origin} names no eos token, which ends every document; add \"eos_token\": \"...\" to "
                             f"its {CONFIG_JSON}")
      self._names["eos"] = guess
    ids = {role: vocab[name] for role, name in self._names.items()}
    self.eos_id: int = ids["eos"]
    self.bos_id: int = ids.get("bos", self.eos_id)
    self.pad_id: int = ids.get("pad", self.eos_id)
    self.unk_id: int = ids.get("unk", -1)
    self._framing = np.asarray(sorted({self.pad_id, self.bos_id, self.eos_id}), dtype=np.int64)
    # What the tokenizer's own post-processor puts before a text (Llama 3's bos; nothing for GPT-2): transformers
    # adds it by default, so lm-eval's hf model scores texts with it, and so does llm-jax's eval (eval/perplexity.py).
    plain, framed = (self._tok.encode("a", add_special_tokens=flag).ids for flag in (False, True))
    self.leading_ids: list[int] = framed[:framed.index(plain[0])] if plain and plain[0] in framed else []

  @classmethod
  def from_folder(cls, folder: str | pathlib.Path, json_name: str = TOKENIZER_JSON) -> HFTokenizer:
    """Reads `folder/json_name` and, when that is tokenizer.json, the other transformers files beside it."""
    folder = pathlib.Path(folder)
    files = {TOKENIZER_JSON: _read(folder / json_name)}
    if json_name == TOKENIZER_JSON:
      files.update({name: _read(folder / name) for name in FILES[1:] if (folder / name).is_file()})
    return cls(files, str(folder / json_name))

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = (ids_N >= 0) & (ids_N < self.vocab_size) & ~np.isin(ids_N, self._framing)
    return self._tok.decode(ids_N[keep].tolist(), skip_special_tokens=False)

  def save(self, workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes tokenizer.json and tokenizer_config.json (and special_tokens_map.json, chat_template.jinja).

    The files read are written unchanged; a tokenizer_config.json the source lacked is written with the
    token names in use. Any other of these files already in `workdir` (another tokenizer's) is removed:
    it would override this tokenizer's specials or template when the workdir is read back.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = {f"{role}_token": name for role, name in self._names.items()}
    written = {CONFIG_JSON: json.dumps({**names, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n",
               **self._files}
    for name in FILES:
      if name in written:
        (workdir / name).write_bytes(written[name].encode("utf-8"))
      else:
        (workdir / name).unlink(missing_ok=True)
    return workdir / TOKENIZER_JSON

  def __getstate__(self) -> dict:
    return {"files": self._files, "origin": self._origin}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["files"], state["origin"])

  def __repr__(self) -> str:
    return f"HFTokenizer({self._origin!r}, vocab_size={self.vocab_size})"
