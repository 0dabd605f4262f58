"""TFDS datasets stored as tfrecord by TensorFlow itself (building them needs the `tf` extra), read by index.

The main test environment has no TensorFlow on purpose (the array_record path must work
without it), so `scripts/test.sh` runs this file a second time in `.venv-tf`, which has the
`tf` extra; there, LLM_JAX_EXPECT_TF=1 turns a missing TensorFlow into a failure.
"""

import importlib.util
import os

import pytest

from llm_jax.config import DataConfig
from llm_jax.data import sources, tfds_source

if importlib.util.find_spec("tensorflow") is None:
  if os.environ.get("LLM_JAX_EXPECT_TF") == "1":
    pytest.fail("LLM_JAX_EXPECT_TF=1 but TensorFlow is not installed", pytrace=False)
  pytest.skip("needs TensorFlow; scripts/test.sh runs this file in .venv-tf", allow_module_level=True)


def test_tfrecord_dataset_reads_like_the_array_record_one(shared_data, tmp_path):
  input_txt = str(shared_data / "tiny_shakespeare" / "input.txt")
  for file_format in ("array_record", "tfrecord"):
    builder = tfds_source._tiny_shakespeare_builder(input_txt, str(tmp_path / file_format), file_format)
    builder.download_and_prepare()
    assert builder.info.file_format.value == file_format
  documents = {}
  for file_format in ("array_record", "tfrecord"):
    config = DataConfig(source="tfds:tiny_shakespeare:validation", tfds_data_dir=str(tmp_path / file_format))
    documents[file_format] = list(sources.load(config, "train"))
  assert documents["tfrecord"] == documents["array_record"]
  text = "".join(piece for piece, _ in documents["tfrecord"])
  with open(input_txt, encoding="utf-8") as f:
    full = f.read()
  rest = full[int(len(full) * 0.9):]
  assert text == rest[:int(len(rest) * 0.5)]  # TFDS's validation split: the next 5% of the characters
