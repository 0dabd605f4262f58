"""Token shards: what `llm-jax data tokenize` writes (`pretokenize.py`) and `data.source=tokens:DIR` reads.

DIR holds `manifest.json` and `shard-00000.arrayrecord`, `shard-00001.arrayrecord`, ... in source
order. A record is one piece of a document, exactly as the pipeline cuts documents from the raw
source (`data.chunk_chars`): its token ids as little-endian uint16 (a vocabulary of at most 65,536)
or uint32, with eos appended when the piece ends its document. So the shards hold the pieces the raw
source gives, in the same order, already tokenized, and the pipeline (which shuffles, shards and
packs pieces by index) makes the same batches from either. ArrayRecord files are written with one
record per chunk (`group_size:1`), so reading one record reads only it; grain's
`ArrayRecordDataSource` gives random access across the shards.

The manifest holds the tokenizer's fingerprint (a SHA-256 of the files it saves), the settings
that shaped the pieces, and per shard its records, documents, tokens and the documents each
cleaning filter removed. A run whose tokenizer differs from the fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import tempfile
from typing import Any

import numpy as np

from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "llm-jax token shards v1"
WRITER_OPTIONS = "group_size:1,zstd:3"


class ShardError(UserError):
  """Token shards that are missing, incomplete or made for another tokenizer."""


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.arrayrecord"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def fingerprint(tokenizer: Tokenizer) -> str:
  """SHA-256 of the files `tokenizer.save` writes: the same for the same tokenizer wherever it is loaded from."""
  digest = hashlib.sha256()
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save(tmp)
    for path in sorted(pathlib.Path(tmp).iterdir()):
      digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
  return "sha256:" + digest.hexdigest()


def read_manifest(directory: str | pathlib.Path) -> dict[str, Any]:
  directory = pathlib.Path(directory).expanduser()
  path = directory / MANIFEST
  if not path.is_file():
    hint = ("it holds an unfinished tokenize run: rerun the same llm-jax data tokenize command to finish it"
            if (directory / ".progress").is_dir() else "write it with llm-jax data tokenize --out " + str(directory))
    raise ShardError(f"tokens:{directory} has no {MANIFEST}; {hint}")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise ShardError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r}); rewrite the shards "
                     "with llm-jax data tokenize")
  return manifest


class TokenShards:
  """The pieces of a tokens:DIR source by index, each an int32 array of token ids (a `documents.Documents`)."""

  def __init__(self, name: str, directory: str):
    import grain
    self.name = name
    self.directory = pathlib.Path(directory).expanduser()
    self.manifest = read_manifest(self.directory)
    self._dtype = np.dtype(self.manifest["dtype"])
    instructions = []
    for shard in self.manifest["shards"]:
      path = self.directory / shard["file"]
      if not path.is_file():
        raise ShardError(f"{name}: shard {shard['file']} is missing; restore it, or rerun llm-jax data tokenize into a "
                         "new --out")
      if shard["records"]:  # a read instruction: grain need not open every file to count its records
        instructions.append(f"{path}[0:{shard['records']}]")
    if not instructions:
      raise ShardError(f"{name} holds no records; tokenize a non-empty source")
    self._source = grain.sources.ArrayRecordDataSource(instructions)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.frombuffer(self._source[index], self._dtype).astype(np.int32)

  def check_tokenizer(self, tokenizer: Tokenizer) -> None:
    """Refuses a tokenizer other than the one that wrote the shards, before the first batch."""
    made = self.manifest["tokenizer"]
    if fingerprint(tokenizer) != made["fingerprint"]:
      raise ShardError(f"{self.name} was tokenized with {made['spec']} (vocab {made['vocab_size']}, "
                       f"{made['fingerprint'][:19]}), not with {tokenizer!r}; set data.tokenizer={made['spec']} or "
                       f"tokenize the source again with this tokenizer")
