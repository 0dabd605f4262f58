"""Resumes that could not continue the saved run are refused in one line, before anything is written;
a second trainer on a busy workdir is refused; a stop asked for before the first step resumes exactly."""

import os
import signal
import subprocess
import sys
import time

import pytest
from test_train_loop import read_metrics, tiny_run_args, train

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


@pytest.mark.slow
def test_a_second_trainer_on_a_busy_workdir_is_refused(shared_data, tmp_path):
  """The same command started twice: the second is refused in one line and the first goes on."""
  workdir = tmp_path / "run"
  args = tiny_run_args(shared_data, workdir, *RUN, "train.steps=100000")
  first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "CI": "true"})
  try:
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").exists():
      assert time.time() < deadline and first.poll() is None
      time.sleep(0.01)
    second = train(args)
    assert second.returncode == 2, second.stderr[-2000:]
    line, = second.stderr.strip().splitlines()
    assert f"is in use by pid {first.pid} on host" in line and "another --workdir" in line
    assert first.poll() is None  # untouched by the refused one
  finally:
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
  assert first.returncode == 0 and "checkpoint saved" in out


@pytest.mark.slow
def test_sigterm_during_the_first_compile_saves_step_one_and_resumes_bitwise(shared_data, tmp_path):
  straight = tmp_path / "straight"
  assert train(tiny_run_args(shared_data, straight, *RUN, "train.steps=4")).returncode == 0
  workdir = tmp_path / "run"
  args = tiny_run_args(shared_data, workdir, *RUN, "train.steps=4")
  process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "CI": "true"})
  for line in process.stdout:  # printed just before the step is compiled
    if "parameters, mesh" in line:
      break
  process.send_signal(signal.SIGTERM)
  out = process.stdout.read()
  process.wait(timeout=120)
  assert process.returncode == 0 and "SIGTERM received" in out, out[-2000:]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
  assert train(args).returncode == 0
  got, expected = read_metrics(workdir), read_metrics(straight)
  assert [got[s]["loss"] for s in range(1, 5)] == [expected[s]["loss"] for s in range(1, 5)]
