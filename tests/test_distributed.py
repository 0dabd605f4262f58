"""Joining processes the way the README documents it: `mesh.coordinator_address=HOST:PORT
mesh.num_processes=N mesh.process_id=I` on each command line, with no JAX_* variables set."""

import pytest
from jax_processes import run_processes  # tests/jax_processes.py
from test_train_loop import read_metrics, tiny_run_args  # tests/test_train_loop.py


@pytest.mark.slow
def test_processes_join_through_config_overrides(shared_data, tmp_path):
  """Two processes of 4 CPU devices each train on one 8-device mesh: a process left alone would have 4
  devices and fail `mesh.data=8` before its first step."""
  workdir = tmp_path / "run"
  cli_args = tiny_run_args(shared_data, workdir, "train.steps=3", "train.log_every=1", "train.eval_every=0",
                           "mesh.cpu_devices=4", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1")[3:]  # no python -m
  script = f"import sys\nfrom llm_jax import cli\nsys.exit(cli.main({cli_args!r} + sys.argv[1:]))"

  def join(process_id, port):
    return [f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2", f"mesh.process_id={process_id}"]

  outputs = run_processes(script, num_processes=2, devices_per_process=4, timeout=400, env={"CI": "true"},
                          jax_env=False, args=join)
  assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in outputs[0], outputs[0][-2000:]
  assert sorted(read_metrics(workdir)) == [1, 2, 3]
  assert (workdir / "checkpoints" / "3").is_dir()
