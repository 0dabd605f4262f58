"""`tfds:NAME[:SPLIT]` sources: TFDS datasets by index, without TensorFlow, and `llm-jax data prepare`.

array_record datasets are read through `tfds.data_source`, tfrecord ones through an index of record
offsets (`TfrecordExamples`). A missing dataset is downloaded when the machine is online; offline,
the error names `llm-jax data prepare`, which builds tiny_shakespeare from a local copy of its
input.txt. Examples larger than a piece (tiny_shakespeare holds each split as one) are cut.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Sequence

import numpy as np

from llm_jax.config import DataConfig
from llm_jax.data.documents import DataError, Examples, chunk_chars, cut_examples, online

if TYPE_CHECKING:
  import tensorflow_datasets as tfds  # imported when a tfds: source is read: it is slow to import

_TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
_PREPARABLE = ("tiny_shakespeare",)
_SPLIT_NAMES = re.compile(r"(?:^|\+)\s*(\w+)")
SPEC = re.compile(r"^(?P<name>[^:\[\]]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")


def _tfds_dir(data_dir: str) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


def _missing_message(name: str, data_dir: str) -> str:
  where = _tfds_dir(data_dir)
  if name in _PREPARABLE:
    return (f"TFDS dataset {name} is not in {where} and cannot be downloaded offline; build it from a local copy: "
            f"llm-jax data prepare {name} --from-file input.txt --data-dir {where}")
  return (f"TFDS dataset {name} is not in {where} and cannot be downloaded offline; build it on a machine with "
          f"internet (tfds build {name} --file_format=array_record --data_dir DIR) and copy DIR to {where}")


def _download(name: str, data_dir: str) -> None:
  import tensorflow_datasets as tfds
  if name == "tiny_shakespeare":
    builder, host = _tiny_shakespeare_builder(None, data_dir), "raw.githubusercontent.com"
  else:
    builder, host = tfds.builder(name, data_dir=data_dir or None, file_format="array_record"), "storage.googleapis.com"
  if not online(host):
    raise DataError(_missing_message(name, data_dir))
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except ModuleNotFoundError as e:
    if e.name != "tensorflow":
      raise
    raise DataError(f"preparing TFDS dataset {name} needs TensorFlow: pip install 'llm-jax[tf]'") from None
  except OSError:  # requests' ConnectionError is an OSError
    raise DataError(_missing_message(name, data_dir)) from None


def dataset_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"TFDS has no dataset {name!r}; see https://www.tensorflow.org/datasets/catalog") from None
  if not builder.is_prepared():
    _download(name, data_dir)
    builder = tfds.builder(name, data_dir=data_dir or None)
  return builder


def examples(name: str, split: str, data: DataConfig) -> Examples:
  builder = dataset_builder(name, data.tfds_data_dir)
  label = f"tfds:{name}:{split}"
  if data.text_field not in builder.info.features:
    raise DataError(f"{label} has no feature {data.text_field!r} (it has {sorted(builder.info.features)}); "
                    "set data.text_field")
  names = _SPLIT_NAMES.findall(split)  # "train[:90%]+validation" names train and validation
  unknown = [n for n in names if n not in builder.info.splits]
  if unknown or not names:
    raise DataError(f"{label}: no split {', '.join(unknown) or split!r}; {name} has {sorted(builder.info.splits)}")
  source = split_source(builder, split)
  chunk = chunk_chars(data)
  examples = Examples(label, source, data.text_field, None)
  split_bytes = sum(builder.info.splits[n].num_bytes for n in names)
  split_examples = sum(builder.info.splits[n].num_examples for n in names)
  if split_examples and split_bytes / split_examples > chunk:  # giant examples: cut them
    examples = cut_examples(examples, np.array([len(examples.text(e)) for e in range(len(source))]), chunk)
  return examples


def split_source(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[dict]:
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
    self.files, parts = [], []
    for k, instruction in enumerate(builder.info.splits[split].file_instructions):
      records = _record_spans(instruction.filename)
      take = instruction.take if instruction.take >= 0 else len(records) - instruction.skip
      parts.append(np.column_stack([np.full(take, k), records[instruction.skip:instruction.skip + take]]))
      self.files.append(instruction.filename)
    self._index = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
    self._fds: dict[int, int] = {}

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> dict:
    file, start, size = self._index[index].tolist()
    if file not in self._fds:
      self._fds[file] = os.open(self.files[file], os.O_RDONLY)
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


def has_split(name: str, split: str, data_dir: str) -> bool:
  return split in dataset_builder(name, data_dir).info.splits


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
