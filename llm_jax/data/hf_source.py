"""`hf:PATH_OR_NAME[:SPLIT]` sources: a Hugging Face `datasets` dataset, one document per row of its text column.

A save_to_disk folder (a DatasetDict's splits by name), .parquet or .arrow files are read offline and
by index (the `datasets` extra); a hub name only when the hub answers.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pathlib
from typing import TYPE_CHECKING

from llm_jax.config import DataConfig
from llm_jax.data.documents import DataError, Examples, chunk_chars, cut_examples, online

if TYPE_CHECKING:
  import datasets  # the `data` extra, imported when a source needs it


def spec(rest: str) -> tuple[str, str]:
  """hf:PATH_OR_NAME[:SPLIT] -> (path or name, split or "")."""
  path, sep, split = rest.rpartition(":")
  return (path, split) if sep and path and split and "/" not in split else (rest, "")


def _local_files(path: str) -> list[str]:
  return sorted(p for p in glob.glob(os.path.expanduser(path)) if p.endswith((".parquet", ".arrow")))


def saved_splits(path: str) -> list[str]:
  """The splits of a local save_to_disk DatasetDict folder (none for anything else)."""
  folder = pathlib.Path(path).expanduser()
  if not (folder / "dataset_dict.json").is_file():
    return []
  return json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])


def open_dataset(rest: str, default_split: str) -> datasets.Dataset:
  """A `datasets.Dataset`: a save_to_disk folder, parquet or arrow files (offline), or a hub name (online)."""
  path, split = spec(rest)
  if importlib.util.find_spec("datasets") is None:
    raise DataError(f"data source hf:{rest} needs the datasets library: pip install 'llm-jax[data]'")
  import datasets
  datasets.logging.disable_progress_bar()
  folder = pathlib.Path(path).expanduser()
  if folder.is_dir() and (folder / "dataset_dict.json").is_file():
    splits = saved_splits(path)
    split = split or default_split
    if split not in splits:
      raise DataError(f"hf:{path} has no split {split!r} (it has {splits}); write hf:{path}:SPLIT")
    return datasets.load_from_disk(str(folder / split))
  if folder.is_dir() and (folder / "dataset_info.json").is_file():
    return datasets.load_from_disk(str(folder))
  files = _local_files(path)
  if files and all(f.endswith(".arrow") for f in files):
    return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
  if files and all(f.endswith(".parquet") for f in files):
    return datasets.Dataset.from_parquet(files, split="train", keep_in_memory=False)
  if folder.exists() or files or path.startswith((".", "/", "~")):
    raise DataError(f"hf:{path} is neither a datasets save_to_disk folder nor .parquet or .arrow files; save it "
                    "with Dataset.save_to_disk(DIR) and pass hf:DIR")
  if not online("huggingface.co"):
    raise DataError(f"hf:{path} is not a local folder and the Hugging Face hub is unreachable (offline); on a machine "
                    f"with network run datasets.load_dataset({path!r}).save_to_disk(DIR), copy DIR here and pass hf:DIR")
  return datasets.load_dataset(path, split=split or default_split)


def texts(rest: str, default_split: str, field: str) -> datasets.Dataset:
  """The dataset with its text column alone (reading a row then decodes nothing else)."""
  dataset = open_dataset(rest, default_split)
  if field not in dataset.column_names:
    raise DataError(f"hf:{rest} has no column {field!r} (it has {dataset.column_names}); set data.text_field")
  return dataset.select_columns([field])


def examples(rest: str, default_split: str, data: DataConfig) -> Examples:
  dataset = texts(rest, default_split, data.text_field)
  import pyarrow.compute as pc
  lengths = pc.utf8_length(dataset.data.column(data.text_field)).to_numpy(zero_copy_only=False)
  return cut_examples(Examples(f"hf:{rest}", dataset, data.text_field, None), lengths, chunk_chars(data))
