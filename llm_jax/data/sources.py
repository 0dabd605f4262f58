"""Documents from `data.source`: TFDS datasets, local text files, JSON lines, or instruction records.

`load(data, split)` returns `Documents`, a random-access sequence of pieces `(text, ends_document)`
that the pipeline shuffles, tokenizes and packs; with data.format alpaca or chat, a sequence of
`templates.Conversation`s instead, one per record. Sources:

- `tfds:NAME[:SPLIT]` (`data.tfds_data_dir`): array_record datasets through `tfds.data_source`,
  tfrecord ones through an index of record offsets (`TfrecordExamples`); neither needs TensorFlow. A missing dataset is downloaded when the machine is online; offline, the error names
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
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import pathlib
import re
import socket
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from llm_jax.config import DataConfig
from llm_jax.data import shards, templates, textfiles
from llm_jax.data.templates import Conversation, Message
from llm_jax.data.textfiles import chunk_spans
from llm_jax.errors import UserError

Piece = tuple[str, bool]  # (text, whether it ends its document)

_TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_PREPARABLE = ("tiny_shakespeare",)
_SPLIT_NAMES = re.compile(r"(?:^|\+)\s*(\w+)")
_TFDS_SPEC = re.compile(r"^(?P<name>[^:\[\]]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")


class DataError(UserError):
  """A data source that is missing, empty, unreadable or misconfigured."""


class Sentence(NamedTuple):
  """One classification example: its text, its class and where it came from (for messages)."""

  text: str
  label: int
  origin: str


class Documents(Sequence[Piece]):
  """Pieces of documents (or, for data.format alpaca and chat, Conversations) in a fixed order; `name`
  says where they came from, for messages."""

  name: str


@dataclasses.dataclass(frozen=True)
class _Pieces(Documents):
  """Pieces held in memory (local files, or a split read in full)."""

  name: str
  pieces: Sequence[Piece]

  def __len__(self) -> int:
    return len(self.pieces)

  def __getitem__(self, index: int) -> Piece:
    return self.pieces[index]


@dataclasses.dataclass(frozen=True)
class _Subset(Documents):
  """The pieces of `parent` at `indices` (a held-out or kept part)."""

  name: str
  parent: Documents
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Piece:
    return self.parent[int(self.indices[index])]


class _Examples(Documents):
  """Examples of a random-access split (TFDS, Hugging Face), each a piece; giant ones cut via `spans`.

  `spans` is a `_SPANS` table of (example, start, stop, last) when examples are cut; one decoded
  example is cached, because the cut pieces of one example are read one after another.
  """

  def __init__(self, name: str, source: Sequence, field: str, spans: np.ndarray | None):
    self.name, self._source, self._field, self._spans = name, source, field, spans
    self._cached: tuple[int, str] | None = None

  def __len__(self) -> int:
    return len(self._spans) if self._spans is not None else len(self._source)

  def __getitem__(self, index: int) -> Piece:
    if self._spans is None:
      return self.text(index), True
    example, start, stop, last = self._spans[index].tolist()
    return self.text(example)[start:stop], last

  def text(self, example: int) -> str:
    if self._cached is None or self._cached[0] != example:
      self._cached = (example, _decode(self._source[example][self._field], f"{self.name} example {example}"))
    return self._cached[1]

  def __getstate__(self) -> dict:  # the cache stays behind when pickled into a worker
    return {**self.__dict__, "_cached": None}


_SPANS = np.dtype([("example", "<i8"), ("start", "<i8"), ("stop", "<i8"), ("last", "?")])


def _cut_examples(examples: _Examples, lengths: np.ndarray, max_chars: int) -> _Examples:
  """`examples` with every one longer than max_chars characters cut into pieces (`chunk_spans`)."""
  long = np.flatnonzero(lengths > max_chars)
  if not len(long):
    return examples
  cuts = {int(e): chunk_spans(examples.text(int(e)), max_chars) for e in long}
  counts = np.ones(len(lengths), np.int64)
  counts[long] = [len(cuts[int(e)]) for e in long]
  spans = np.zeros(int(counts.sum()), _SPANS)
  spans["example"] = np.repeat(np.arange(len(lengths)), counts)
  spans["stop"] = np.repeat(lengths, counts)
  ends = np.cumsum(counts) - 1
  spans["last"][ends] = True
  for e, pieces in cuts.items():
    first = ends[e] - len(pieces) + 1
    spans["start"][first:ends[e] + 1], spans["stop"][first:ends[e] + 1] = zip(*pieces)
  return _Examples(examples.name, examples._source, examples._field, spans)


def _decode(value: bytes | str, where: str) -> str:
  if isinstance(value, str):
    return value
  try:
    return value.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: invalid UTF-8 at byte offset {e.start}; re-encode the data as UTF-8") from None
  except AttributeError:
    raise DataError(f"{where}: the field is {type(value).__name__}, not text; set data.text_field to a text feature") from None


def _chunk_chars(data: DataConfig) -> int:
  if data.chunk_chars < 0:
    raise DataError(f"data.chunk_chars={data.chunk_chars}: expected 0 (auto) or a positive number of characters")
  return data.chunk_chars or 32 * data.seq_len


# ----------------------------------------------------------------------------- local files


def _files(scheme: str, pattern: str) -> list[pathlib.Path]:
  matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  files = [pathlib.Path(p) for p in matches if os.path.isfile(p)]
  if not files:
    hint = f"only directories match; use {pattern.rstrip('/')}/*" if matches else f"check the path (from {os.getcwd()})"
    raise DataError(f"data source {scheme}:{pattern} matches no file; {hint}")
  return files


def _read_text(path: pathlib.Path) -> str:
  return textfiles.read_text(path, DataError)


# ----------------------------------------------------------------------------- instruction records


def _records(scheme: str, path: pathlib.Path) -> list[tuple[str, object]]:
  """(where, record) of a json: file (one array; "FILE record N") or a jsonl: file ("FILE line N")."""
  text = _read_text(path)
  if scheme == "jsonl":
    records = []
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          records.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
          raise DataError(f"{path} line {number}: not JSON ({e.msg}); each line must be one JSON object") from None
  elif not text.strip():
    records = []
  else:
    try:
      array = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); a json: source is one JSON "
                      "array of records") from None
    if not isinstance(array, list):
      raise DataError(f"{path} holds a JSON {type(array).__name__}, not an array of records; write [{{...}}, ...] or "
                      "use jsonl: for a record per line")
    records = [(f"{path} record {number}", record) for number, record in enumerate(array, 1)]
  if not records:
    raise DataError(f"{path} holds no records; add some or leave the file out of data.source")
  return records


def _alpaca_example(record: object, where: str) -> Conversation:
  if not isinstance(record, dict):
    raise DataError(f"{where} is a JSON {type(record).__name__}, not an object with instruction, input and output")
  for key in ("instruction", "output"):
    if not isinstance(record.get(key), str):
      raise DataError(f"{where} has no {key!r} string (it has {sorted(record)}); every Alpaca record needs "
                      "instruction and output (input may be empty)")
  extra = record.get("input")
  if extra is not None and not isinstance(extra, str):
    raise DataError(f"{where}: 'input' is a {type(extra).__name__}, not a string; make it text or \"\"")
  return Conversation((Message("user", record["instruction"], extra or ""), Message("assistant", record["output"])),
                      where)


def _chat_example(record: object, where: str) -> Conversation:
  messages = record.get("messages") if isinstance(record, dict) else None
  if not isinstance(messages, list) or not messages:
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where} has no 'messages' list (found {found}); a chat record is "
                    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')
  out = []
  for k, message in enumerate(messages, 1):
    role = message.get("role") if isinstance(message, dict) else None
    if role not in templates.ROLES:
      raise DataError(f"{where}: message {k} has role {role!r}; use one of {', '.join(templates.ROLES)}")
    if not isinstance(message.get("content"), str):
      raise DataError(f"{where}: message {k} ({role}) has no 'content' string; give every message its text")
    out.append(Message(role, message["content"]))
  if not any(m.role == "assistant" for m in out):
    raise DataError(f"{where} has no assistant message, so nothing to train on; add the response or drop the record")
  return Conversation(tuple(out), where)


def _instruction_examples(scheme: str, pattern: str, data_format: str) -> list[Conversation]:
  make = _alpaca_example if data_format == "alpaca" else _chat_example
  return [make(record, where) for path in _files(scheme, pattern) for where, record in _records(scheme, path)]


# ----------------------------------------------------------------------------- classification rows


def _tsv_sentences(pattern: str, num_classes: int) -> list[Sentence]:
  """The rows of every file under a header line; labels checked against the classes when known (> 0)."""
  out = []
  for path in _files("tsv", pattern):
    lines = _read_text(path).splitlines()
    header = lines[0].split("\t") if lines else []
    if len(header) == 2 and header[1].strip().lstrip("-").isdigit():
      raise DataError(f"{path}:1 looks like a data row, not a header; add a first line sentence<TAB>label")
    rows = [(number, line) for number, line in enumerate(lines[1:], 2) if line.strip()]
    if not rows:
      raise DataError(f"{path} holds no rows after its header; add lines of sentence<TAB>label or leave it out")
    for number, line in rows:
      where = f"{path}:{number}"
      text, tab, label = line.rpartition("\t")
      if not tab:
        raise DataError(f"{where}: no tab in {line[:40]!r}; each row is sentence<TAB>label")
      try:
        value = int(label.strip())
      except ValueError:
        raise DataError(f"{where}: label {label.strip()!r} is not an integer; write the class number 0..C-1") from None
      if value < 0 or (num_classes > 0 and value >= num_classes):
        raise DataError(f"{where}: label {value} is outside the classes 0..{num_classes - 1}; fix the row or set "
                        f"model.num_classes to the number of classes")
      out.append(Sentence(text.strip(), value, where))
  return out


# ----------------------------------------------------------------------------- TFDS


def _tfds_dir(data_dir: str) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


def _missing_message(name: str, data_dir: str) -> str:
  where = _tfds_dir(data_dir)
  if name in _PREPARABLE:
    return (f"TFDS dataset {name} is not in {where} and cannot be downloaded offline; build it from a local copy: "
            f"llm-jax data prepare {name} --from-file input.txt --data-dir {where}")
  return (f"TFDS dataset {name} is not in {where} and cannot be downloaded offline; build it on a machine with "
          f"internet (tfds build {name} --file_format=array_record --data_dir DIR) and copy DIR to {where}")


def _online(host: str) -> bool:
  """Whether `host` answers: checked first, because an offline TFDS download retries for minutes."""
  try:
    socket.create_connection((host, 443), timeout=5).close()
    return True
  except OSError:
    return False


def _download(name: str, data_dir: str) -> None:
  import tensorflow_datasets as tfds
  if name == "tiny_shakespeare":
    builder, host = _tiny_shakespeare_builder(None, data_dir), "raw.githubusercontent.com"
  else:
    builder, host = tfds.builder(name, data_dir=data_dir or None, file_format="array_record"), "storage.googleapis.com"
  if not _online(host):
    raise DataError(_missing_message(name, data_dir))
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except ModuleNotFoundError as e:
    if e.name != "tensorflow":
      raise
    raise DataError(f"preparing TFDS dataset {name} needs TensorFlow: pip install 'llm-jax[tf]'") from None
  except OSError:  # requests' ConnectionError is an OSError
    raise DataError(_missing_message(name, data_dir)) from None


def _tfds_builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"TFDS has no dataset {name!r}; see https://www.tensorflow.org/datasets/catalog") from None
  if not builder.is_prepared():
    _download(name, data_dir)
    builder = tfds.builder(name, data_dir=data_dir or None)
  return builder


def _tfds_examples(name: str, split: str, data: DataConfig) -> _Examples:
  builder = _tfds_builder(name, data.tfds_data_dir)
  label = f"tfds:{name}:{split}"
  if data.text_field not in builder.info.features:
    raise DataError(f"{label} has no feature {data.text_field!r} (it has {sorted(builder.info.features)}); "
                    "set data.text_field")
  names = _SPLIT_NAMES.findall(split)  # "train[:90%]+validation" names train and validation
  unknown = [n for n in names if n not in builder.info.splits]
  if unknown or not names:
    raise DataError(f"{label}: no split {', '.join(unknown) or split!r}; {name} has {sorted(builder.info.splits)}")
  source = _split_examples(builder, split)
  chunk = _chunk_chars(data)
  examples = _Examples(label, source, data.text_field, None)
  split_bytes = sum(builder.info.splits[n].num_bytes for n in names)
  split_examples = sum(builder.info.splits[n].num_examples for n in names)
  if split_examples and split_bytes / split_examples > chunk:  # giant examples: cut them
    examples = _cut_examples(examples, np.array([len(examples.text(e)) for e in range(len(source))]), chunk)
  return examples


def _split_examples(builder, split: str) -> Sequence[dict]:
  """A TFDS split by index: array_record through `tfds.data_source`, tfrecord through `TfrecordExamples`."""
  import tensorflow_datasets as tfds
  if builder.info.file_format == tfds.core.FileFormat.TFRECORD:
    return TfrecordExamples(builder, split)
  return builder.as_data_source(split=split)


class TfrecordExamples(Sequence[dict]):
  """The examples of a tfrecord TFDS split by index, without TensorFlow and without reading them all.

  tfrecord has no index, so one pass over each file's 12-byte record headers (length, CRC) finds
  where every record starts (16 bytes an example, kept); a record is then read with one `pread`
  and decoded by the dataset's own features (`deserialize_example_np`, as TFDS's array_record data
  source does). CRCs are not checked.
  """

  def __init__(self, builder, split: str):
    self._features = builder.info.features
    self._files, parts = [], []
    for k, instruction in enumerate(builder.info.splits[split].file_instructions):
      records = _record_spans(instruction.filename)
      take = instruction.take if instruction.take >= 0 else len(records) - instruction.skip
      parts.append(np.column_stack([np.full(take, k), records[instruction.skip:instruction.skip + take]]))
      self._files.append(instruction.filename)
    self._index = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
    self._fds: dict[int, int] = {}

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> dict:
    file, start, size = self._index[index].tolist()
    if file not in self._fds:
      self._fds[file] = os.open(self._files[file], os.O_RDONLY)
    return self._features.deserialize_example_np(os.pread(self._fds[file], size, start))

  def __getstate__(self) -> dict:  # file descriptors stay behind when pickled into a worker
    return {**self.__dict__, "_fds": {}}


def _record_spans(path: str) -> np.ndarray:
  """(data offset, length) of every record of a tfrecord file: length uint64, its CRC, data, the data's CRC."""
  spans = []
  with open(path, "rb") as f:
    while header := f.read(12):
      length = int.from_bytes(header[:8], "little")
      spans.append((f.tell(), length))
      f.seek(length + 4, os.SEEK_CUR)
  return np.array(spans, np.int64).reshape(-1, 2)


def _has_split(name: str, split: str, data_dir: str) -> bool:
  return split in _tfds_builder(name, data_dir).info.splits


def prepare(name: str, from_file: str, data_dir: str) -> str:
  """Builds TFDS dataset `name` in `data_dir` from a local copy of its source file, offline and
  without TensorFlow; returns the dataset's directory."""
  if name not in _PREPARABLE:
    raise DataError(f"llm-jax data prepare knows {', '.join(_PREPARABLE)}, not {name!r}")
  if not os.path.isfile(from_file):
    raise DataError(f"--from-file {from_file}: no such file; pass the dataset's input.txt")
  import tensorflow_datasets as tfds
  builder = _tiny_shakespeare_builder(from_file, data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)


def _tiny_shakespeare_builder(source_file: str | None, data_dir: str, file_format: str = "array_record"):
  """The stock TFDS tiny_shakespeare builder with its download step replaced.

  The stock `_split_generators` fetches input.txt and reads it through `tf.io.gfile`, which needs
  TensorFlow; this one takes a local file (or downloads with TFDS's own download manager) and
  reads it with Python, then splits exactly as the stock builder does: the first 90% of the
  characters for train, then 5% validation and 5% test, each one example. Dataset name,
  version, features and metadata are the stock builder's, so the result is the real dataset.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.tiny_shakespeare import tiny_shakespeare_dataset_builder as stock

  class OfflineTinyShakespeare(stock.Builder, skip_registration=True):
    name = "tiny_shakespeare"
    pkg_dir_path = stock.Builder._get_pkg_dir_path()  # the stock metadata (description, citation)

    def _split_generators(self, dl_manager):
      path = source_file or dl_manager.download(_TINY_SHAKESPEARE_URL)
      with open(path, encoding="utf-8", newline="") as f:  # tf.io.gfile keeps newlines as they are too
        text = f.read()
      i = int(len(text) * 0.9)
      train, rest = text[:i], text[i:]
      i = int(len(rest) * 0.5)
      splits = {"train": train, "validation": rest[:i], "test": rest[i:]}
      return [tfds.core.SplitGenerator(name=split, gen_kwargs={"split_key": split, "split_text": text})
              for split, text in splits.items()]

  return OfflineTinyShakespeare(data_dir=data_dir or None, file_format=file_format)


# ----------------------------------------------------------------------------- Hugging Face datasets


def _hf_spec(rest: str) -> tuple[str, str]:
  """hf:PATH_OR_NAME[:SPLIT] -> (path or name, split or "")."""
  path, sep, split = rest.rpartition(":")
  return (path, split) if sep and path and split and "/" not in split else (rest, "")


def _hf_local_files(path: str) -> list[str]:
  return sorted(p for p in glob.glob(os.path.expanduser(path)) if p.endswith((".parquet", ".arrow")))


def _hf_splits(path: str) -> list[str]:
  """The splits of a local save_to_disk DatasetDict folder (none for anything else)."""
  folder = pathlib.Path(path).expanduser()
  if not (folder / "dataset_dict.json").is_file():
    return []
  return json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])


def _hf_dataset(rest: str, default_split: str):
  """A `datasets.Dataset`: a save_to_disk folder, parquet or arrow files (offline), or a hub name (online)."""
  path, split = _hf_spec(rest)
  if importlib.util.find_spec("datasets") is None:
    raise DataError(f"data source hf:{rest} needs the datasets library: pip install 'llm-jax[data]'")
  import datasets
  datasets.logging.disable_progress_bar()
  folder = pathlib.Path(path).expanduser()
  if folder.is_dir() and (folder / "dataset_dict.json").is_file():
    splits = _hf_splits(path)
    split = split or default_split
    if split not in splits:
      raise DataError(f"hf:{path} has no split {split!r} (it has {splits}); write hf:{path}:SPLIT")
    return datasets.load_from_disk(str(folder / split))
  if folder.is_dir() and (folder / "dataset_info.json").is_file():
    return datasets.load_from_disk(str(folder))
  files = _hf_local_files(path)
  if files and all(f.endswith(".arrow") for f in files):
    return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
  if files and all(f.endswith(".parquet") for f in files):
    return datasets.Dataset.from_parquet(files, split="train", keep_in_memory=False)
  if folder.exists() or files or path.startswith((".", "/", "~")):
    raise DataError(f"hf:{path} is neither a datasets save_to_disk folder nor .parquet or .arrow files; save it "
                    "with Dataset.save_to_disk(DIR) and pass hf:DIR")
  if not _online("huggingface.co"):
    raise DataError(f"hf:{path} is not a local folder and the Hugging Face hub is unreachable (offline); on a machine "
                    f"with network run datasets.load_dataset({path!r}).save_to_disk(DIR), copy DIR here and pass hf:DIR")
  return datasets.load_dataset(path, split=split or default_split)


def _hf_texts(rest: str, default_split: str, field: str):
  """The dataset with its text column alone (reading a row then decodes nothing else)."""
  dataset = _hf_dataset(rest, default_split)
  if field not in dataset.column_names:
    raise DataError(f"hf:{rest} has no column {field!r} (it has {dataset.column_names}); set data.text_field")
  return dataset.select_columns([field])


def _hf_examples(rest: str, default_split: str, data: DataConfig) -> _Examples:
  dataset = _hf_texts(rest, default_split, data.text_field)
  import pyarrow.compute as pc
  lengths = pc.utf8_length(dataset.data.column(data.text_field)).to_numpy(zero_copy_only=False)
  return _cut_examples(_Examples(f"hf:{rest}", dataset, data.text_field, None), lengths, _chunk_chars(data))


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
    return [Part(str(path), file=str(path)) for path in _files(scheme, rest)]
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
    yield _decode(source[index][data.text_field], f"{data.source} example {index}")


def _example_source(data: DataConfig) -> Sequence[dict]:
  """The examples of a tfds: or hf: source, by index."""
  scheme, rest = _parse(data.source)
  if scheme == "hf":
    return _hf_texts(rest, "train", data.text_field)
  match = _TFDS_SPEC.match(rest)
  if not match:
    raise DataError(f"data source {data.source!r}: expected tfds:NAME[:SPLIT], e.g. tfds:tiny_shakespeare:train")
  return _split_examples(_tfds_builder(match["name"], data.tfds_data_dir), match["split"] or "train")


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
    return _Pieces(spec, _tsv_sentences(rest, num_classes))
  if data.format != "text":
    if scheme not in ("json", "jsonl"):
      raise DataError(f"data.format={data.format} reads records from json:GLOB or jsonl:GLOB, not {spec!r}; point "
                      "the source at the record files or set data.format=text")
    return _Pieces(spec, _instruction_examples(scheme, rest, data.format))
  if scheme == "json":
    raise DataError(f"data source {spec!r} holds instruction records: set data.format=alpaca or data.format=chat")
  if scheme == "tfds":
    match = _TFDS_SPEC.match(rest)
    if not match:
      raise DataError(f"data source {spec!r}: expected tfds:NAME[:SPLIT], e.g. tfds:tiny_shakespeare:train")
    return _tfds_examples(match["name"], match["split"] or default_split, data)
  if scheme == "hf":
    return _hf_examples(rest, default_split, data)
  if scheme == "tokens":
    return shards.TokenShards(spec, rest)
  return textfiles.FilePieces(spec, _files(scheme, rest), scheme, data.text_split, data.text_field, _chunk_chars(data),
                              DataError)


def _own_validation(data: DataConfig) -> str | None:
  """`tfds:NAME:validation` when data.source is a TFDS dataset with a validation split."""
  scheme, rest = _parse(data.source)
  match = _TFDS_SPEC.match(rest) if scheme == "tfds" else None
  if match and _has_split(match["name"], "validation", data.tfds_data_dir):
    return f"tfds:{match['name']}:validation"
  if scheme == "hf" and not _hf_spec(rest)[1] and "validation" in _hf_splits(_hf_spec(rest)[0]):
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
    return _Subset(f"{docs.name} (held out)", docs, eval_indices)
  if not len(eval_indices):
    return docs
  return _Subset(docs.name, docs, np.setdiff1d(np.arange(len(docs)), eval_indices))


def token_shards(docs: Documents) -> shards.TokenShards | None:
  """The tokens:DIR source under `docs` (a split of it), or None when `docs` holds text."""
  while isinstance(docs, _Subset):
    docs = docs.parent
  return docs if isinstance(docs, shards.TokenShards) else None


def _check_nonempty(docs: Documents) -> Documents:
  if not len(docs):
    raise DataError(f"{docs.name} holds no text; point data.source at a non-empty dataset")
  return docs
