"""Fine-tuning through the trainer: `train.init_from` brings the base's architecture and tokenizer."""

import subprocess
import sys

import pytest
from test_train_loop import REPO, tiny_run_args, train

import llm_jax
from llm_jax import config as config_lib

pytestmark = pytest.mark.slow


def test_init_from_takes_the_bases_architecture_and_tokenizer(shared_data, tmp_path):
  spm = tmp_path / "spm512.model"
  made = subprocess.run([sys.executable, "-m", "llm_jax", "tokenizer", "train", "--input",
                         str(shared_data / "tiny_shakespeare/input.txt"), "--vocab-size", "512", "--out", str(spm)],
                        capture_output=True, text=True, timeout=300)
  assert made.returncode == 0, made.stderr[-2000:]
  base = tmp_path / "base"
  result = train(tiny_run_args(shared_data, base, "train.steps=2", "train.eval_every=0", f"data.tokenizer={spm}",
                               "model.num_layers=3"))
  assert result.returncode == 0, result.stderr[-3000:]

  # The fine-tuning command names only the base and run-time fields: the config file's own model
  # (4 layers of width 256, byte tokens) is replaced by the base's (3 layers of width 64, spm).
  tuned = tmp_path / "tuned"
  args = [sys.executable, "-m", "llm_jax", "train", "--config", str(REPO / "tests/gpt2_bytes_config.py"),
          "--workdir", str(tuned), f"data.source=text:{shared_data / 'tiny_shakespeare/input.txt'}",
          "data.text_split=blank_line", "data.seq_len=64", "train.batch_size=16", "train.steps=2",
          "train.eval_every=0", "sample.max_new_tokens=8", f"train.init_from={base}", "model.resid_dropout=0.1"]
  result = train(args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"starting from the parameters of {base}" in result.stdout
  saved = config_lib.load_json(tuned / "config.json")
  base_cfg = config_lib.load_json(base / "config.json")
  assert saved.model == config_lib.replace(base_cfg, model={"resid_dropout": 0.1}).model
  assert saved.data.tokenizer == str(base)
  text = "ROMEO: What light through yonder window breaks?"
  assert llm_jax.load(tuned).tokenizer.encode(text) == llm_jax.load(base).tokenizer.encode(text)

  resumed = train([*args, "train.steps=3"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from step 2" in resumed.stdout
