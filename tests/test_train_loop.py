"""The trainer through the real `llm-jax train` command, on real text, in real processes."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import jax_processes  # tests/jax_processes.py
from jax_processes import run_processes

import llm_jax
from llm_jax import config as config_lib
from llm_jax import host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]
KEYS = {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_s", "mfu", "kernel_s_per_step"}


def tiny_run_args(shared_data, workdir, *extra):
  """A small GPT-2 on Tiny Shakespeare's bytes: a few seconds a dozen steps on 2 cores.

  No end-of-run sample (its compile is a sixth of a tiny run's time) and no curves.png (matplotlib's import
  and one drawing, about 1.3 s of each run: tests/test_plot.py draws it); the end-to-end test asks for both.
  """
  return [sys.executable, "-m", "llm_jax", "train", "--config", str(REPO / "tests/gpt2_bytes_config.py"),
          "--workdir", str(workdir), f"data.source=text:{shared_data / 'tiny_shakespeare/input.txt'}",
          "data.text_split=blank_line", "model.num_layers=2", "model.d_model=64", "model.num_heads=4",
          "model.num_kv_heads=4", "model.d_ff=256", "data.seq_len=64", "model.max_len=64", "train.batch_size=16",
          "optim.warmup_steps=5", "optim.learning_rate=3e-3", "train.eval_batches=2", "sample.max_new_tokens=0",
          "train.curves=false", *extra]


def train(args, optimized: bool = False, **kwargs):
  """`optimized`: compiled at XLA's default level (jax_processes.optimized), for a run of hundreds of steps."""
  env = {**os.environ, "CI": "true"}  # plain log lines, no progress bar
  env = jax_processes.optimized(env) if optimized else env
  return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def read_metrics(workdir):
  """Last record of each step (a resumed run may repeat steps its killed predecessor logged)."""
  records = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    records[record["step"]] = record
  return records


@pytest.mark.slow
def test_train_command_end_to_end(shared_data, tmp_path):
  workdir = tmp_path / "run"
  result = train(tiny_run_args(shared_data, workdir, "train.steps=40", "train.log_every=5", "train.eval_every=20",
                               "train.checkpoint_every=20", "sample.max_new_tokens=16", "train.curves=true"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "curves.png").read_bytes().startswith(b"\x89PNG")
  records = read_metrics(workdir)
  assert sorted(records) == [5, 10, 15, 20, 25, 30, 35, 40]
  for record in records.values():
    assert KEYS <= record.keys()
    assert record["tokens_per_sec"] > 0 and 0 < record["mfu"] < 1.5
    assert 0 <= record["kernel_s_per_step"] <= os.cpu_count() * record["step_time_s"] + 0.01  # CPU s per wall s
  assert {"eval_loss", "eval_perplexity"} <= records[20].keys() and "eval_loss" in records[40]
  assert "eval_loss" not in records[15]
  assert records[40]["loss"] < records[5]["loss"] - 0.5  # bytes: from ~5.5 nats towards ~2.5
  assert records[40]["eval_loss"] < records[20]["eval_loss"]
  saved = config_lib.load_json(workdir / "config.json")
  assert saved.train.steps == 40 and saved.model.num_layers == 2
  assert config_lib.from_dict(json.loads(config_lib.to_json(saved))) == saved
  assert (workdir / "tokenizer.json").is_file()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "40"]
  assert list((workdir / "tensorboard").iterdir())
  assert "step 40 |" in result.stdout and "loss" in result.stdout  # plain lines in CI
  sample = result.stdout.split("--- sample ---\n")[1].split("\n--------------")[0]
  assert sample.startswith("ROMEO:") and len(sample.encode()) > len("ROMEO:")
  # the config's mesh.cpu_devices=2 overrides the 8 devices of this test process's XLA_FLAGS
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in result.stdout
  if host_memory.huge_pages_available():  # the command asked for huge pages: steps 6-35 tried them (step 20 evaluated)
    lines = result.stdout.splitlines()
    decided = [i for i, line in enumerate(lines) if re.fullmatch(
        r"llm-jax: huge pages (kept|turned off) for this run: a step took \S+ of its time without them .*", line)]
    assert len(decided) == 1 and lines[decided[0] + 1].startswith("step 35 |")


@pytest.mark.slow
def test_dropout_run_resumes_bitwise(shared_data, tmp_path):
  """With every dropout on, a run stopped at step 8 and resumed to 16 gives the losses and parameters of one
  uninterrupted 16-step run bit for bit: the dropout RNG is restored, not drawn again from the seed."""
  common = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=8", "optim.schedule=constant",
            "model.embed_dropout=0.1", "model.attn_dropout=0.1", "model.resid_dropout=0.1"]
  straight = tmp_path / "straight"
  result = train(tiny_run_args(shared_data, straight, "train.steps=16", *common))
  assert result.returncode == 0, result.stderr[-3000:]
  halves = tmp_path / "halves"
  assert train(tiny_run_args(shared_data, halves, "train.steps=8", *common)).returncode == 0
  resumed = train(tiny_run_args(shared_data, halves, "train.steps=16", *common))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from step 8" in resumed.stdout
  expected, got = read_metrics(straight), read_metrics(halves)
  assert sorted(got) == list(range(1, 17))
  for step in range(1, 17):
    assert got[step]["loss"] == expected[step]["loss"], step
    assert got[step]["grad_norm"] == expected[step]["grad_norm"], step
  jax.tree.map(np.testing.assert_array_equal, llm_jax.load(halves).params, llm_jax.load(straight).params)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(shared_data, tmp_path):
  workdir = tmp_path / "run"
  args = tiny_run_args(shared_data, workdir, "train.steps=100000", "train.log_every=1", "train.eval_every=0",
                       "train.checkpoint_every=0")
  process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "CI": "true"})
  deadline = time.time() + 300
  while time.time() < deadline and not ((workdir / "metrics.jsonl").exists() and
                                        len((workdir / "metrics.jsonl").read_text().splitlines()) >= 3):
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-3000:]
  assert "SIGTERM received" in output and "checkpoint saved" in output
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir()]
  assert len(steps) == 1 and 3 <= steps[0] < 100000
  resumed = train([*args[:-4], "train.steps=" + str(steps[0] + 2), *args[-3:]])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from step {steps[0]}" in resumed.stdout
  assert max(read_metrics(workdir)) == steps[0] + 2


def test_workdir_of_another_architecture_is_refused(shared_data, tmp_path):
  workdir = tmp_path / "run"
  first = train(tiny_run_args(shared_data, workdir, "train.steps=1", "train.eval_every=0"))
  assert first.returncode == 0, first.stderr[-3000:]
  before = (workdir / "config.json").read_text()
  result = train(tiny_run_args(shared_data, workdir, "train.steps=2", "model.num_layers=3"))
  assert result.returncode == 2
  assert "holds a run with model.num_layers=2, this config has 3" in result.stderr and "--fresh" in result.stderr
  assert (workdir / "config.json").read_text() == before  # nothing overwritten
  assert (workdir / "checkpoints" / "1").is_dir()
  fresh = train([*tiny_run_args(shared_data, workdir, "train.steps=2", "model.num_layers=3"), "--fresh"])
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  assert config_lib.load_json(workdir / "config.json").model.num_layers == 3


def test_tokenizer_larger_than_model_vocab_fails_at_start(shared_data, tmp_path):
  result = train(tiny_run_args(shared_data, tmp_path / "run", "model.vocab_size=128", "train.steps=2"))
  assert result.returncode == 2
  assert "128" in result.stderr and "260" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_processes_equal_one_process_with_eight_devices(shared_data, tmp_path):
  """Real jax.distributed on 127.0.0.1, 4 CPU devices each: same losses, and the checkpoint the
  two processes wrote together restores in this one process with the same parameters."""
  common = ["train.steps=6", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
            "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  single = tmp_path / "single"
  assert train(tiny_run_args(shared_data, single, *common, "mesh.cpu_devices=8")).returncode == 0
  multi = tmp_path / "multi"
  args = tiny_run_args(shared_data, multi, *common, "mesh.cpu_devices=4")[3:]  # drop python -m llm_jax
  run_processes(f"import sys\nfrom llm_jax import cli\nsys.exit(cli.main({args!r}))", num_processes=2,
                devices_per_process=4, timeout=400, env={"CI": "true"})
  expected, got = read_metrics(single), read_metrics(multi)
  assert sorted(got) == list(range(1, 7))
  for step in range(1, 7):
    assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
  single_params = llm_jax.load(single).params
  multi_params = llm_jax.load(multi).params
  # atol: a weight whose gradient is float noise (~1e-12, e.g. an unused position's row) still takes an Adam step
  # of lr * g / (|g| + eps), ~1e-7 here and of either sign; a real sharding error moves weights by ~lr = 3e-3.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), multi_params, single_params)


@pytest.mark.slow
def test_init_from_an_export_starts_from_its_parameters(shared_data, tmp_path):
  first = tmp_path / "first"
  assert train(tiny_run_args(shared_data, first, "train.steps=3", "train.eval_every=0")).returncode == 0
  export = subprocess.run([sys.executable, "-m", "llm_jax", "export", "--workdir", str(first), "--out",
                           str(tmp_path / "export")], capture_output=True, text=True)
  assert export.returncode == 0, export.stderr[-2000:]
  # One step at learning rate 0 (weight decay scales with it) leaves the parameters as loaded.
  second = tmp_path / "second"
  result = train(tiny_run_args(shared_data, second, "train.steps=1", "train.eval_every=0", "optim.learning_rate=0",
                               "optim.warmup_steps=0", f"train.init_from={tmp_path / 'export'}", "train.seed=7"))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "starting from the parameters of" in result.stdout
  jax.tree.map(np.testing.assert_array_equal, llm_jax.load(second).params, llm_jax.load(first).params)


SECOND_INTERRUPT_IN_GC = """
import gc, signal
from llm_jax.train.loop import _Stop
stop = _Stop()
stop.install()
signal.raise_signal(signal.SIGINT)
assert stop.requested  # the first one only asks the loop to stop after its step
gc.callbacks.append(lambda phase, info: phase == "start" and signal.raise_signal(signal.SIGINT))
gc.collect()  # the second one lands in a gc callback (as in jax's), where an exception would be dropped
print("still running")
"""


def test_second_interrupt_aborts_at_once_even_inside_a_gc_callback():
  result = subprocess.run([sys.executable, "-c", SECOND_INTERRUPT_IN_GC], capture_output=True, text=True, timeout=120)
  assert result.returncode == 130, result.stderr[-2000:]
  assert "still running" not in result.stdout
  assert result.stderr.strip().splitlines()[-1].startswith("llm-jax: interrupted;")
