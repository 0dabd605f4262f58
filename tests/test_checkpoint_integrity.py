"""Damaged checkpoints on disk: a flipped byte, a truncated file, a missing commit marker, a cut-off save.

Each is found before anything is read, reported in one line, and passed over for the
checkpoint before it, by `generate` (which only reads) and by `train` (which also moves the
damaged one aside, so rotation can never delete the intact one to make room for it).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_train_loop import read_metrics, tiny_run_args, train

pytestmark = pytest.mark.slow

RUN = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2", "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
  """A run with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = train(tiny_run_args(shared_data, workdir, *RUN, "train.steps=4"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(trained, copy)
  return copy


def array_file(step_dir):
  """The largest data file of a checkpoint's parameters (the one holding the weights)."""
  return max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def generate(path, *extra):
  return subprocess.run([sys.executable, "-m", "llm_jax", "generate", "--workdir", str(path), "--prompt", "ROMEO:",
                         "--max-new-tokens", "8", "--json", *extra], capture_output=True, text=True, timeout=300)


def test_flipped_byte_is_found_and_the_previous_checkpoint_used(run_copy, shared_data):
  damaged = array_file(run_copy / "checkpoints" / "4")
  data = bytearray(damaged.read_bytes())
  data[len(data) // 2] ^= 0x01
  damaged.write_bytes(bytes(data))

  result = generate(run_copy)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "skipping checkpoint 4: its file params/" in result.stdout and "does not match its checksum" in result.stdout
  from_step_2 = generate(run_copy / "checkpoints" / "2")
  assert json.loads(result.stdout.splitlines()[-1]) == json.loads(from_step_2.stdout.splitlines()[-1])

  direct = generate(run_copy / "checkpoints" / "4")  # asked for by name: refused, not silently replaced
  assert direct.returncode == 2 and len(direct.stderr.strip().splitlines()) == 1
  assert "checkpoint" in direct.stderr and "is damaged" in direct.stderr

  resumed = train(tiny_run_args(shared_data, run_copy, *RUN, "train.steps=6"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "checkpoint 4 is damaged" in resumed.stdout and "resuming from step 2" in resumed.stdout
  assert (run_copy / "damaged_checkpoints" / "4" / "params").is_dir()  # kept for a look, out of the rotation
  assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["4", "6"]
  assert sorted(read_metrics(run_copy)) == list(range(1, 7))


def test_truncated_file_is_one_line_and_falls_back(run_copy, shared_data):
  damaged = array_file(run_copy / "checkpoints" / "4")
  size = damaged.stat().st_size
  damaged.write_bytes(damaged.read_bytes()[: size // 3])
  direct = generate(run_copy / "checkpoints" / "4")
  assert direct.returncode == 2 and len(direct.stderr.strip().splitlines()) == 1
  assert f"bytes instead of {size} (truncated or overwritten)" in direct.stderr
  resumed = train(tiny_run_args(shared_data, run_copy, *RUN, "train.steps=5"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from step 2" in resumed.stdout and "Traceback" not in resumed.stderr


def test_missing_commit_marker_means_incomplete_for_every_command(run_copy, shared_data):
  (run_copy / "checkpoints" / "4" / "commit_success.txt").unlink()
  result = generate(run_copy)
  assert result.returncode == 0 and "skipping checkpoint 4: it has no commit_success.txt" in result.stdout
  resumed = train(tiny_run_args(shared_data, run_copy, *RUN, "train.steps=5"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from step 2" in resumed.stdout


def test_an_interrupted_save_is_removed_and_the_restart_from_zero_said(run_copy, shared_data):
  checkpoints = run_copy / "checkpoints"
  (checkpoints / "4").rename(checkpoints / "4.orbax-checkpoint-tmp")
  shutil.rmtree(checkpoints / "2")
  result = train(tiny_run_args(shared_data, run_copy, *RUN, "train.steps=2"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "removed 4.orbax-checkpoint-tmp, a checkpoint save that was interrupted" in result.stdout
  assert "no complete checkpoint" in result.stdout and "the run starts from step 0" in result.stdout
  assert sorted(p.name for p in checkpoints.iterdir()) == ["2"]


def test_a_second_ctrl_c_is_one_line_and_the_run_resumes(shared_data, tmp_path):
  workdir = tmp_path / "run"
  args = tiny_run_args(shared_data, workdir, *RUN, "train.steps=100000")
  process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "CI": "true"})
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "2").exists():
    assert time.time() < deadline and process.poll() is None
    time.sleep(0.01)
  process.send_signal(signal.SIGINT)
  time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130, err[-3000:]
  assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("llm-jax: interrupted;")
  latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  resumed = train(tiny_run_args(shared_data, workdir, *RUN, f"train.steps={latest + 1}"))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from step {latest}" in resumed.stdout
  assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
