"""Documents from `data.source`: TFDS datasets, local text files, JSON lines, or instruction records.

`load(data, split)` returns `Documents`, a random-access sequence of pieces `(text, ends_document)`
that the pipeline shuffles, tokenizes and packs; with data.format alpaca or chat, a sequence of
`templates.Conversation`s instead, one per record. Sources:

- `tfds:NAME[:SPLIT]` (`data.tfds_data_dir`): array_record datasets through `tfds.data_source`,
  tfrecord ones through an index of record offsets (`tfds_source.TfrecordExamples`); neither needs TensorFlow. A missing dataset is downloaded when the machine is online; offline, the error names
  `llm-jax data prepare`, which builds tiny_shakespeare from a local copy of its input.txt.
- `text:GLOB`: one document per file, or per block of lines between blank lines
  (`data.text_split`); files are read as strict UTF-8, and a bad byte is reported with its offset.
- `jsonl:GLOB`: one document per line, the string field `data.text_field`.
- `hf:PATH_OR_NAME[:SPLIT]`: a Hugging Face `datasets` dataset (a save_to_disk folder, .parquet or
  .arrow files; a hub name only online), one document per row, the column `data.text_field`.
- `tokens:DIR`: pieces tokenized ahead by `llm-jax data tokenize` (`shards.py`), as token id arrays.
- `json:GLOB` (a JSON array of records per file) or `jsonl:GLOB` (a record per line), with
  `data.format=alpaca`: records `{"instruction", "input", "output"}` (input may be empty or absent);
  with `data.format=chat`: records `{"messages": [{"role", "content"}, ...]}`, roles system, user and
  assistant, any number of turns, at least one assistant turn. A bad record fails with its file,
  record (json) or line (jsonl) number and the fix; so does a file with no records.
- `tsv:GLOB` with `data.format=classification`: a header line, then rows `sentence<TAB>label`
  (GLUE's SST-2 layout), the label an integer 0..model.num_classes-1; each row becomes a
  `Sentence`. A row without a tab, a label outside the classes or a file without rows fails with
  the file, line and fix.

Pieces: a document longer than `data.chunk_chars` characters (default 32 x seq_len) is cut, after
a newline where one is near, into pieces that are shuffled apart like documents. TFDS
tiny_shakespeare holds each split as one example of a million characters: without cutting, a
"shuffle" of its train split would be no shuffle at all. Only the last piece of a document ends it
(the pipeline appends eos there); the others end without eos, so the model never learns to stop
mid-text. Cutting loses only the attention across the cut, which a row boundary loses anyway.

Evaluation (`split="eval"`): `data.eval_source` when set; else the dataset's own validation split
(TFDS); else `data.eval_fraction` of the pieces (or records), evenly spaced through the data (deterministic and
independent of the seed), which the train split then leaves out.

Test (`split="test"`, classification only): `data.test_source`, read whole.

Text and JSONL documents are read lazily (`textfiles.py`: an index of each piece's bytes, built in one
pass at start); instruction records and tsv rows are read into memory; TFDS splits are read lazily by index.

Where each reader lives: `tfds_source.py` (tfds:, and `llm-jax data prepare`), `hf_source.py` (hf:),
`textfiles.py` (text:, jsonl: documents), `records.py` (json:/jsonl: records, tsv: rows), `shards.py`
(tokens:); `documents.py` holds what they share. This module picks one and splits its pieces.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterator, Sequence

import numpy as np

from llm_jax.config import DataConfig
from llm_jax.data import hf_source, records, shards, textfiles, tfds_source
from llm_jax.data.documents import DataError, Documents, Pieces, Subset, chunk_chars, decode, files


# ----------------------------------------------------------------------------- whole documents (llm-jax data tokenize)


@dataclasses.dataclass(frozen=True)
class Part:
  """A share of a source's documents that one tokenize worker reads on its own, in order: a file (text:,
  jsonl:) or a range of examples (tfds:, hf:)."""

  label: str  # what the manifest calls it
  file: str = ""
  start: int = 0
  stop: int = -1


def parts(data: DataConfig, examples_per_part: int) -> list[Part]:
  """`data.source` cut into parts whose documents, concatenated in order, are those `load` cuts into pieces."""
  scheme, rest = _parse(data.source)
  if data.format != "text" or scheme not in ("text", "jsonl", "tfds", "hf"):
    raise DataError(f"llm-jax data tokenize reads documents (text:, jsonl:, tfds: or hf: with data.format=text), "
                    f"not {data.source!r} with data.format={data.format}")
  if scheme in ("text", "jsonl"):
    return [Part(str(path), file=str(path)) for path in files(scheme, rest)]
  source = _example_source(data)
  bounds = list(range(0, len(source), examples_per_part)) + [len(source)]
  return [Part(f"examples {a}:{b}", start=a, stop=b) for a, b in zip(bounds, bounds[1:])]


def part_documents(part: Part, data: DataConfig) -> Iterator[str]:
  """The documents of `part`, one at a time."""
  scheme, rest = _parse(data.source)
  if part.file:
    yield from (doc.text for doc in textfiles.documents(pathlib.Path(part.file), scheme, data.text_split,
                                                        data.text_field, DataError))
    return
  source = _example_source(data)
  for index in range(part.start, part.stop):
    yield decode(source[index][data.text_field], f"{data.source} example {index}")


def _example_source(data: DataConfig) -> Sequence[dict]:
  """The examples of a tfds: or hf: source, by index."""
  scheme, rest = _parse(data.source)
  if scheme == "hf":
    return hf_source.texts(rest, "train", data.text_field)
  match = tfds_source.SPEC.match(rest)
  if not match:
    raise DataError(f"data source {data.source!r}: expected tfds:NAME[:SPLIT], e.g. tfds:tiny_shakespeare:train")
  return tfds_source.split_source(tfds_source.dataset_builder(match["name"], data.tfds_data_dir), match["split"] or "train")


# ----------------------------------------------------------------------------- selection


def _parse(spec: str) -> tuple[str, str]:
  scheme, sep, rest = spec.partition(":")
  if not sep or scheme not in ("tfds", "text", "jsonl", "json", "tsv", "hf", "tokens") or not rest:
    raise DataError(f"data source {spec!r}: expected tfds:NAME[:SPLIT], text:GLOB, jsonl:GLOB, hf:PATH_OR_NAME[:SPLIT] "
                    "or tokens:DIR (or json:GLOB, with data.format=alpaca or chat; tsv:GLOB with "
                    "data.format=classification)")
  return scheme, rest


def _open(spec: str, data: DataConfig, default_split: str, num_classes: int = 0) -> Documents:
  scheme, rest = _parse(spec)
  if data.format not in ("text", "alpaca", "chat", "classification"):
    raise DataError(f"data.format={data.format!r}: expected text, alpaca, chat or classification")
  if (data.format == "classification") != (scheme == "tsv"):
    raise DataError(f"data source {spec!r} with data.format={data.format}: classification reads tsv:GLOB files of "
                    "sentence<TAB>label, and only it does; set both together")
  if scheme == "tsv":
    return Pieces(spec, records.tsv_sentences(rest, num_classes))
  if data.format != "text":
    if scheme not in ("json", "jsonl"):
      raise DataError(f"data.format={data.format} reads records from json:GLOB or jsonl:GLOB, not {spec!r}; point "
                      "the source at the record files or set data.format=text")
    return Pieces(spec, records.instruction_examples(scheme, rest, data.format))
  if scheme == "json":
    raise DataError(f"data source {spec!r} holds instruction records: set data.format=alpaca or data.format=chat")
  if scheme == "tfds":
    match = tfds_source.SPEC.match(rest)
    if not match:
      raise DataError(f"data source {spec!r}: expected tfds:NAME[:SPLIT], e.g. tfds:tiny_shakespeare:train")
    return tfds_source.examples(match["name"], match["split"] or default_split, data)
  if scheme == "hf":
    return hf_source.examples(rest, default_split, data)
  if scheme == "tokens":
    return shards.TokenShards(spec, rest)
  return textfiles.FilePieces(spec, files(scheme, rest), scheme, data.text_split, data.text_field, chunk_chars(data),
                              DataError)


def _own_validation(data: DataConfig) -> str | None:
  """`tfds:NAME:validation` when data.source is a TFDS dataset with a validation split."""
  scheme, rest = _parse(data.source)
  match = tfds_source.SPEC.match(rest) if scheme == "tfds" else None
  if match and tfds_source.has_split(match["name"], "validation", data.tfds_data_dir):
    return f"tfds:{match['name']}:validation"
  if scheme == "hf" and not hf_source.spec(rest)[1] and "validation" in hf_source.saved_splits(hf_source.spec(rest)[0]):
    return f"hf:{rest}:validation"
  return None


def held_out(count: int, fraction: float) -> np.ndarray:
  """Indices of the evaluation pieces: round(fraction x count), at least one, evenly spaced."""
  if not 0 < fraction < 1 or count < 2:
    return np.zeros(0, dtype=np.int64)
  n = min(count - 1, max(1, round(fraction * count)))
  return ((np.arange(n) + 0.5) * count / n).astype(np.int64)


def load(data: DataConfig, split: str, num_classes: int = 0) -> Documents:
  """The pieces of the train, eval or test split of `data.source` (see the module docstring);
  `num_classes` > 0 bounds classification labels."""
  if split not in ("train", "eval", "test"):
    raise DataError(f"split {split!r}: expected train, eval or test")
  if split == "test":
    if not data.test_source:
      raise DataError("there is no test split: set data.test_source=tsv:PATH")
    return _check_nonempty(_open(data.test_source, data, "test", num_classes))
  if split == "eval" and data.eval_source:
    return _check_nonempty(_open(data.eval_source, data, "validation", num_classes))
  validation = None if data.eval_source else _own_validation(data)
  if split == "eval" and validation:
    return _check_nonempty(_open(validation, data, "validation"))
  docs = _check_nonempty(_open(data.source, data, "train", num_classes))
  if data.eval_source or validation:
    return docs
  eval_indices = held_out(len(docs), data.eval_fraction)
  if split == "eval":
    if not len(eval_indices):
      raise DataError(f"{docs.name} has no evaluation data ({len(docs)} piece(s), data.eval_fraction="
                      f"{data.eval_fraction}); set data.eval_source or a data.eval_fraction between 0 and 1")
    return Subset(f"{docs.name} (held out)", docs, eval_indices)
  if not len(eval_indices):
    return docs
  return Subset(docs.name, docs, np.setdiff1d(np.arange(len(docs)), eval_indices))


def token_shards(docs: Documents) -> shards.TokenShards | None:
  """The tokens:DIR source under `docs` (a split of it), or None when `docs` holds text."""
  while isinstance(docs, Subset):
    docs = docs.parent
  return docs if isinstance(docs, shards.TokenShards) else None


def _check_nonempty(docs: Documents) -> Documents:
  if not len(docs):
    raise DataError(f"{docs.name} holds no text; point data.source at a non-empty dataset")
  return docs
