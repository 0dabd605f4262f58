"""Resumes that could not continue the saved run are refused in one line, before anything is written."""

import subprocess
import sys

import pytest
from test_train_loop import tiny_run_args, train

RUN = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = train(tiny_run_args(shared_data, workdir, *RUN, "train.steps=4"))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def snapshot(workdir):
  """Every file's bytes under the workdir, to show a refused command changed nothing."""
  return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def refused(shared_data, workdir, *overrides):
  before = snapshot(workdir)
  result = train(tiny_run_args(shared_data, workdir, *RUN, *overrides))
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert snapshot(workdir) == before
  return lines[0]


@pytest.mark.parametrize("steps", [4, 2])
def test_a_run_at_or_past_its_target_says_so(shared_data, trained, steps):
  line = refused(shared_data, trained, f"train.steps={steps}")
  assert f"is already at step 4, and train.steps={steps}: nothing to train; raise train.steps" in line


def test_another_tokenizer_of_the_same_size_is_refused(shared_data, trained, tmp_path):
  """A sentencepiece model that fits the same model.vocab_size (512): same shapes, other meanings."""
  model = tmp_path / "spm512.model"
  made = subprocess.run([sys.executable, "-m", "llm_jax", "tokenizer", "train", "--input",
                         str(shared_data / "tiny_shakespeare/input.txt"), "--vocab-size", "512", "--out", str(model)],
                        capture_output=True, text=True, timeout=300)
  assert made.returncode == 0, made.stderr[-2000:]
  line = refused(shared_data, trained, "train.steps=6", f"data.tokenizer={model}")
  assert "was trained with data.tokenizer='byte'" in line and f"data.tokenizer='{model}'" in line


def test_another_seq_len_names_the_setting_and_both_values(shared_data, trained):
  line = refused(shared_data, trained, "train.steps=6", "data.seq_len=32")
  assert "this run has data.seq_len=32 but its checkpoint was saved with 64" in line
