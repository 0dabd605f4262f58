"""The profiler hook: a real jax.profiler trace of the chosen train steps, read back from disk."""

import gzip
import json

import pytest
from test_train_loop import tiny_run_args  # tests/test_train_loop.py

from llm_jax import cli
from llm_jax import config as config_lib
from llm_jax.train import profile


def traced(directory):
  """{step: the run ids of the jit_train_step ops in it}, from the one trace under `directory`."""
  runs = sorted((directory / "plugins" / "profile").iterdir())
  assert len(runs) == 1, runs
  assert list(runs[0].glob("*.xplane.pb")), list(runs[0].iterdir())  # TensorBoard's profile plugin reads this
  events = json.loads(gzip.decompress((runs[0] / "perfetto_trace.json.gz").read_bytes()))["traceEvents"]
  steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "step_num" in e.get("args", {}))
  ops = [e for e in events if e.get("args", {}).get("hlo_module") == "jit_train_step"]
  return steps, {e["args"]["run_id"] for e in ops}, {e["name"] for e in ops}


@pytest.mark.slow
def test_trace_holds_the_traced_steps_ops(shared_data, tmp_path, capsys):
  """--profile traces 5 steps after the first 5; a resume traces its own train.profile_steps window."""
  workdir = tmp_path / "run"
  args = tiny_run_args(shared_data, workdir, "train.eval_every=0", "mesh.cpu_devices=8")[3:]  # in this process: its 8 CPU devices
  assert cli.main(["train", "--profile", *args[1:], "train.steps=12"]) == 0
  assert "llm-jax: profile of steps 6-10 written to" in capsys.readouterr().out
  steps, runs, ops = traced(workdir / "profile")
  assert steps == [6, 7, 8, 9, 10]
  assert len(runs) == 5  # each traced step's execution, and no other: the trace ends when step 10 has run
  assert any("dot" in name or "fusion" in name for name in ops), ops

  (workdir / "profile").rename(tmp_path / "first_profile")
  assert cli.main([*args, "train.steps=15", "train.profile_steps=14:20"]) == 0  # the window is cut at the last step
  steps, runs, _ = traced(workdir / "profile")
  assert steps == [14, 15] and len(runs) == 2


def test_window_of_each_setting():
  assert profile.window("", False, 0, 100) is None
  assert profile.window("", True, 0, 100) == (6, 10)
  assert profile.window("", True, 40, 100) == (46, 50)  # a resumed run: after its own compilation
  assert profile.window("", True, 0, 3) == (2, 3)  # too short to skip 5: all but the compiling step
  assert profile.window("", True, 0, 1) == (1, 1)
  assert profile.window("3:4", True, 0, 100) == (3, 4)  # the config's window wins
  assert profile.window("3:8", False, 5, 6) == (6, 6)
  assert profile.window("3:4", False, 4, 10) is None  # a resume past the window


@pytest.mark.parametrize("value", ["7", "a:b", "0:3", "5:2", "3:", "1:2:3"])
def test_bad_profile_steps_is_one_line(value, capsys):
  assert cli.main(["train", "--config", "configs/tiny_shakespeare.py", "--workdir", "/nonexistent/never/written", "mesh.cpu_devices=0",
                   f"train.profile_steps={value}"]) == 2
  err = capsys.readouterr().err
  assert err == (f"llm-jax: error: train.profile_steps={value!r}: expected START:END, the first and last step to trace "
                 "with 1 <= START <= END (e.g. 10:15), or '' for no trace\n")


def test_profile_after_the_last_step_is_refused():
  config = config_lib.override(config_lib.Config(), ["train.steps=10", "train.profile_steps=11:12"])
  with pytest.raises(config_lib.ConfigError, match=r"starts after the run's last step \(train.steps=10\)"):
    config_lib.validate_ranges(config)
