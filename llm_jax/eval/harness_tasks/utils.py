"""Datasets of the repo's lm-eval task YAMLs, read from local files (lm-eval imports this by path)."""

import pathlib


def piqa_dataset(piqa_dir: str = "", **metadata):
  """{"validation": PIQA's validation questions with their labels}, from `piqa_dir` or llm-jax's eval.piqa."""
  import datasets

  from llm_jax.config import EvalConfig
  from llm_jax.eval import tasks

  del metadata  # lm-eval passes every task's metadata (version, ...) to this function
  cfg = EvalConfig() if not piqa_dir else EvalConfig(piqa=str(pathlib.Path(piqa_dir).absolute()))
  folder = tasks.reader("piqa", cfg).files["questions"].parent
  return {"validation": datasets.Dataset.from_list(tasks.piqa_rows(folder))}
