"""Recovery of a multi-process run: real `jax.distributed` processes on 127.0.0.1, killed and resumed.

Every run here uses a constant learning rate after warmup, so a run asked for 1,000 steps takes
the same first steps as one asked for 16: a run can be killed long before its end (by
configuration, not by hoping the machine is slow) and resumed to the steps of the reference.
Evaluation, `train.init_from` and early stopping's bookkeeping run in every one of them.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
from jax_processes import REPO, _environment, free_port  # tests/jax_processes.py
from test_train_loop import read_metrics, tiny_run_args, train

pytestmark = pytest.mark.slow

STEPS = 16
COMMON = ["train.log_every=1", "train.eval_every=4", "train.checkpoint_every=4", "train.early_stop_patience=20",
          "optim.schedule=constant", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"]


def args_for(shared_data, workdir, base, *extra):
  return tiny_run_args(shared_data, workdir, *COMMON, f"train.init_from={base}", *extra)


def start_processes(args: list[str], num_processes: int = 2, devices: int = 2) -> list[subprocess.Popen]:
  """`llm-jax train ARGS` in `num_processes` real processes joined through jax.distributed."""
  cli_args = args[3:] + [f"mesh.cpu_devices={devices}"]  # drop `python -m llm_jax`
  script = f"import sys\nfrom llm_jax import cli\nsys.exit(cli.main({cli_args!r}))"
  port = free_port()
  return [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=_environment(i, num_processes, devices, port, {"CI": "true"}))
          for i in range(num_processes)]


def finish(processes: list[subprocess.Popen], timeout: float = 400) -> list[str]:
  outputs = [p.communicate(timeout=timeout)[0] for p in processes]
  for i, (p, out) in enumerate(zip(processes, outputs)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out[-3000:]}"
  return outputs


def run_one_process(args: list[str], devices: int = 4) -> str:
  result = train([*args, f"mesh.cpu_devices={devices}"])
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result.stdout


def wait_for(condition, processes, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, "timed out"
    assert all(p.poll() is None for p in processes), "a process ended early"
    time.sleep(0.01)


def assert_losses(got: dict, expected: dict, steps, rel: float | None) -> None:
  for step in steps:
    if rel is None:
      assert got[step]["loss"] == expected[step]["loss"], step
      assert got[step]["grad_norm"] == expected[step]["grad_norm"], step
    else:
      assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=rel), step
  for step in steps:
    if "eval_loss" in expected[step]:
      assert got[step]["eval_loss"] == pytest.approx(expected[step]["eval_loss"], rel=rel or 0), step


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
  """A 2-step run to start from, and the uninterrupted 2-process reference run of STEPS steps."""
  root = tmp_path_factory.mktemp("runs")
  base = root / "base"
  run_one_process(tiny_run_args(shared_data, base, "train.steps=2", "train.eval_every=0"), devices=1)
  reference = root / "reference"
  outputs = finish(start_processes(args_for(shared_data, reference, base, f"train.steps={STEPS}")))
  assert f"starting from the parameters of {base}" in outputs[0]
  expected = read_metrics(reference)
  assert sorted(expected) == list(range(1, STEPS + 1))
  assert all("eval_loss" in expected[s] for s in (4, 8, 12, 16))
  return root, base, expected


def test_sigkill_both_processes_and_resume_bitwise(shared_data, runs):
  root, base, expected = runs
  workdir = root / "killed"
  args = args_for(shared_data, workdir, base, "train.steps=1000")
  processes = start_processes(args)
  wait_for(lambda: (workdir / "checkpoints" / "4" / "commit_success.txt").exists(), processes)
  for p in processes:
    p.send_signal(signal.SIGKILL)
  for p in processes:
    p.wait()
  outputs = finish(start_processes([*args, f"train.steps={STEPS}"]))
  assert "resuming from step 4" in outputs[0]
  assert_losses(read_metrics(workdir), expected, range(5, STEPS + 1), rel=None)


def test_one_process_run_resumes_on_two_processes(shared_data, runs):
  root, base, expected = runs
  workdir = root / "grown"
  run_one_process(args_for(shared_data, workdir, base, "train.steps=8"))
  outputs = finish(start_processes(args_for(shared_data, workdir, base, f"train.steps={STEPS}")))
  assert "resuming from step 8" in outputs[0]
  assert_losses(read_metrics(workdir), expected, range(1, STEPS + 1), rel=1e-6)


def test_sigterm_to_one_process_stops_both_after_the_same_step(shared_data, runs):
  """Only process 1 is signalled; both stop after one agreed step, save one checkpoint, exit 0."""
  root, base, expected = runs
  workdir = root / "preempted"
  args = args_for(shared_data, workdir, base, "train.steps=1000", "train.log_every=2")
  processes = start_processes(args)
  metrics = workdir / "metrics.jsonl"
  wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, processes)
  processes[1].send_signal(signal.SIGTERM)
  outputs = finish(processes, timeout=300)
  assert "SIGTERM received" in outputs[1] and "SIGTERM received" not in outputs[0]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  stopped = steps[-1]
  assert stopped % 2 == 0 and stopped < 1000  # the processes agree at logged steps only
  assert f"stopped at step {stopped}; checkpoint saved" in outputs[0]
  assert stopped + 2 <= STEPS, "the run was signalled too late to compare its resumption"
  # It resumes, here on one process, and continues the reference curve.
  out = run_one_process(args_for(shared_data, workdir, base, f"train.steps={STEPS}"))
  assert f"resuming from step {stopped}" in out
  got = read_metrics(workdir)
  assert sorted(got) == list(range(2, stopped + 1, 2)) + list(range(stopped + 1, STEPS + 1))
  assert_losses(got, expected, sorted(got), rel=1e-6)


def test_early_stopping_decision_survives_a_resume(shared_data, tmp_path):
  """At learning rate 0 no evaluation improves (the loss stays the same, and only a lower one counts): the first
  evaluation (step 2) sets the best, steps 4 and 6 make two without a gain, and patience 2 stops the run at step 6.
  A run stopped at step 4 and resumed must stop there too, from the count its checkpoint kept."""
  common = ["train.eval_every=2", "train.early_stop_patience=2", "optim.learning_rate=0", "train.log_every=1"]
  resumed = tmp_path / "resumed"
  run_one_process(tiny_run_args(shared_data, resumed, *common, "train.steps=4"), devices=1)
  loop_metadata = resumed / "checkpoints" / "4" / "loop" / "metadata"
  assert json.loads(loop_metadata.read_text())["evals_without_gain"] == 1  # counted in the first run, kept to disk
  out = run_one_process(tiny_run_args(shared_data, resumed, *common, "train.steps=20"), devices=1)
  assert "resuming from step 4" in out and "stopping early at step 6" in out
  assert max(read_metrics(resumed)) == 6
  assert json.loads((resumed / "checkpoints" / "6" / "loop" / "metadata").read_text())["evals_without_gain"] == 2
