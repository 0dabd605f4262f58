"""The launch scripts of scripts/launch/: real processes on 127.0.0.1, and the TPU script's printed plan."""

import os
import re
import shlex
import socket
import subprocess

import pytest
from jax_processes import JAX_JOIN_ENV, REPO, _environment, _wait  # tests/jax_processes.py
from test_train_loop import read_metrics, tiny_run_args  # tests/test_train_loop.py

LAUNCH = REPO / "scripts" / "launch"


def launch_env() -> dict:
  """This environment without the JAX_* join variables, importing this checkout's llm_jax."""
  env = {k: v for k, v in os.environ.items() if k not in JAX_JOIN_ENV}
  return {**env, "PYTHONPATH": str(REPO), "CI": "true"}


def local(num: int, logs, *command: str, timeout: float = 400, deaf_to_sigterm: bool = False
          ) -> subprocess.CompletedProcess:
  """local.sh N -- command. `deaf_to_sigterm`: the script and its processes start with SIGTERM ignored (set by a
  shell that then execs local.sh; an ignored signal stays ignored across exec), so the stop local.sh sends after
  a failure changes no exit code. (Not preexec_fn: forking this multithreaded JAX process is unsafe.)"""
  args = ["bash", str(LAUNCH / "local.sh"), str(num), "--logs", str(logs), "--", *command]
  if deaf_to_sigterm:
    args = ["bash", "-c", 'trap "" TERM; exec "$@"', "bash", *args]
  return subprocess.run(args, capture_output=True, text=True, env=launch_env(), timeout=timeout)


@pytest.mark.slow
def test_local_sh_trains_then_resumes_in_two_processes(shared_data, tmp_path):
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  args = tiny_run_args(shared_data, workdir, "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2",
                       "mesh.cpu_devices=2", "optim.schedule=constant")
  first = local(2, logs / "first", *args, "train.steps=2")
  assert first.returncode == 0, first.stderr[-3000:]
  log0 = (logs / "first" / "process_0.log").read_text()
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in log0, log0[-2000:]  # 2 processes x 2 devices, one mesh
  assert "step 2 |" in first.stdout  # process 0's log is shown as it runs
  assert (logs / "first" / "process_1.log").is_file()
  second = local(2, logs / "second", *args, "train.steps=4")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming from step 2" in (logs / "second" / "process_0.log").read_text()
  assert sorted(read_metrics(workdir)) == [1, 2, 3, 4]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_local_sh_exits_with_the_worst_code_and_stops_the_rest(tmp_path):
  # process 1 fails at once; process 0 would sleep a minute: it is stopped, and its code (SIGTERM's) is the worst
  script = 'if [ "$JAX_PROCESS_ID" = 1 ]; then echo "p1 $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES"; exit 3; fi; exec sleep 60'
  result = local(2, tmp_path, "bash", "-c", script, timeout=60)
  assert result.returncode == 128 + 15, result.stderr
  assert re.fullmatch(r"p1 127\.0\.0\.1:\d+ 2\n", (tmp_path / "process_1.log").read_text())
  assert "process 1 exited with 3" in result.stderr
  # Codes 0, 2 and 4: the worst is 4. Without deaf_to_sigterm, the stop that process 1's failure sends could
  # reach process 2 before it exits (143): CI saw that once on a loaded machine.
  assert local(3, tmp_path, "bash", "-c", "exit $((JAX_PROCESS_ID * 2))", deaf_to_sigterm=True).returncode == 4
  assert local(0, tmp_path, "true").returncode == 2  # usage


def slurm_job_id() -> int:
  """A job id whose coordinator port (jax's SlurmCluster: 61440 + id % 4096) is free now."""
  for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 61440 + job_id % 4096))
      except OSError:
        continue
    return 700000 + job_id % 4096
  raise AssertionError("no free port in 61440-65535")


@pytest.mark.slow
def test_slurm_tasks_join_through_jax_cluster_detection(shared_data, tmp_path):
  """Two tasks of one SLURM job step on one node: only the SLURM_* variables srun sets, no coordinator."""
  workdir = tmp_path / "run"
  job = slurm_job_id()
  args = tiny_run_args(shared_data, workdir, "train.steps=2", "train.log_every=1", "train.eval_every=0",
                       "mesh.cpu_devices=2")
  procs = []
  for task in range(2):
    slurm = {"SLURM_JOB_ID": str(job), "SLURM_JOBID": str(job), "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
             "SLURM_NPROCS": "2", "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_NODEID": "0",
             "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_STEP_NODELIST": "127.0.0.1",
             "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
             "SLURM_TASKS_PER_NODE": "2", "PYTHONPATH": str(REPO), "CI": "true"}
    env = _environment(task, 2, 2, 0, slurm, jax_env=False)
    assert not {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} & env.keys()
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=open(tmp_path / f"task_{task}.log", "w"),
                                  stderr=subprocess.STDOUT))
  failure = _wait(procs, timeout=400)
  log0 = (tmp_path / "task_0.log").read_text()
  assert not failure, failure + "\n" + log0[-2000:] + (tmp_path / "task_1.log").read_text()[-2000:]
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in log0  # one mesh over both tasks' devices
  assert sorted(read_metrics(workdir)) == [1, 2]


def test_slurm_script_requeues_and_saves_before_the_time_limit():
  text = (LAUNCH / "slurm.sbatch").read_text()
  directives = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, re.M))
  assert directives["signal"] == "B:TERM@120" and "requeue" in directives
  assert directives["ntasks-per-node"] == "1"
  assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0
  assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text


def tpu_dry_run(*args: str) -> list[list[str]]:
  env = {**launch_env(), "PATH": "/usr/bin:/bin"}  # no gcloud: a dry run must not need it
  result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("#")]


def test_tpu_vm_dry_run_prints_every_command():
  command = ["llm-jax", "train", "--config", "configs/gpt2_124m.py", "--workdir", "/mnt/runs/gpt2",
             "data.source=text:/mnt/data/*.txt", "sample.prompt=it's ROMEO"]
  lines = tpu_dry_run("--name", "pod", "--zone", "us-central2-b", "--type", "v4-16", "--project", "proj", "--spot",
                      "--dry-run", "--", *command)
  where = ["--zone", "us-central2-b", "--project", "proj"]
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert lines[0] == [*tpu, "describe", "pod", *where]
  assert lines[1] == [*tpu, "create", "pod", *where, "--accelerator-type", "v4-16", "--version",
                      "tpu-ubuntu2204-base", "--spot"]
  archive = lines[2][-1]
  assert lines[2][:2] == ["git", "-C"] and archive.endswith(".tgz")
  assert lines[3] == [*tpu, "scp", archive, "pod:llm-jax.tgz", *where, "--worker=all"]
  ssh = [*tpu, "ssh", "pod", *where, "--worker=all", "--command"]
  remote = [line[-1] for line in lines if line[:-1] == ssh]
  assert len(remote) == 3  # unpack, install, run: each on every worker
  assert "tar -xzf llm-jax.tgz" in remote[0] and "pip install -q -e ." in remote[1]
  run = shlex.split(remote[2].split("{", 1)[1].split(";", 1)[0])
  assert run == command  # the user's words arrive on each worker unchanged
  assert "tee logs/" in remote[2] and "$(hostname).log" in remote[2]
  assert "export LLM_JAX_CLUSTER=1" in remote[2]  # jax.distributed.initialize() finds the slice in GCE metadata
  assert lines[-1][:5] == [*tpu, "scp"] and lines[-1][-1] == "--worker=all"


def test_tpu_vm_dry_run_from_a_git_repository():
  lines = tpu_dry_run("--name", "pod", "--zone", "z", "--repo", "https://example.com/llm-jax.git", "--ref", "v1",
                      "--dry-run", "--", "llm-jax", "train")
  remote = [line[-1] for line in lines if "--command" in line]
  assert "git clone -q https://example.com/llm-jax.git llm-jax" in remote[0] and "checkout -q v1" in remote[0]
  assert not any("llm-jax.tgz" in " ".join(line) for line in lines)  # nothing copied


def test_tpu_vm_needs_a_name_zone_and_command():
  result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "--name", "pod", "--dry-run", "--", "llm-jax"],
                          capture_output=True, text=True)
  assert result.returncode == 2 and "--name NAME --zone ZONE" in result.stderr
