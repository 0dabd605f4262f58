"""Runs a script in several real `jax.distributed` processes on 127.0.0.1, for multi-host tests.

Each process gets its own simulated CPU devices and the environment that
`llm_jax.distributed.initialize` reads (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); the script calls it (or `jax.distributed.initialize()`) itself. Collectives
between the processes go through gloo, jax's default on CPU.

  outputs = run_processes(SCRIPT, num_processes=2, devices_per_process=4)

returns every process's stdout; a process that fails or hangs fails the call with every
process's output, and the others are stopped at once rather than left waiting for it.

With `jax_env=False` the JAX_* variables are neither set nor inherited, so a script that joins
by other means (e.g. `mesh.coordinator_address=...` overrides, as the README documents) is
tested alone; `args(process_id, port)` gives each process its command-line arguments.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parents[1]

# tests/conftest.py adds these to XLA_FLAGS for the session, and every process a test starts inherits them:
# LLVM's level 0 and XLA's older elemental emitters for fusions, because the tests' tiny models spend their
# time compiling (conftest.py has the figures).
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def optimized(env: dict) -> dict:
  """`env` without FAST_COMPILE: for a process whose time goes to running hundreds of steps, not compiling."""
  return {**env, "XLA_FLAGS": " ".join(f for f in env.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE)}


def free_port() -> int:
  """A TCP port nobody listens on right now (the coordinator binds it moments later)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


JAX_JOIN_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _environment(process_id: int, num_processes: int, devices: int, port: int, extra: dict | None,
                 jax_env: bool = True) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in JAX_JOIN_ENV}
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(
      XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
      JAX_PLATFORMS="cpu",
      PYTHONUNBUFFERED="1",
  )
  if jax_env:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
  env.update(extra or {})
  return env


def run_processes(script_source: str, num_processes: int = 2, devices_per_process: int = 4,
                  timeout: float = 240, env: dict | None = None, jax_env: bool = True,
                  args: Callable[[int, int], list[str]] | None = None) -> list[str]:
  """Runs `script_source` in `num_processes` processes; returns their stdouts in process order.

  `jax_env=False` leaves the JAX_* join variables out; `args(process_id, port)` are each
  process's command-line arguments (`sys.argv[1:]` in the script). Raises AssertionError with
  all outputs when any process exits non-zero or the run exceeds `timeout` seconds.
  """
  port = free_port()
  with tempfile.TemporaryDirectory() as tmp:
    script = pathlib.Path(tmp) / "multiprocess_script.py"
    script.write_text(script_source)
    logs = [(open(pathlib.Path(tmp) / f"{i}.out", "w+"), open(pathlib.Path(tmp) / f"{i}.err", "w+"))
            for i in range(num_processes)]
    procs = [subprocess.Popen([sys.executable, str(script), *(args(i, port) if args else [])], cwd=REPO, stdout=out,
                              stderr=err, env=_environment(i, num_processes, devices_per_process, port, env, jax_env))
             for i, (out, err) in enumerate(logs)]
    failure = _wait(procs, timeout)
    outputs = []
    for out, err in logs:
      out.seek(0), err.seek(0)
      outputs.append((out.read(), err.read()))
      out.close(), err.close()
  if failure:
    report = "\n".join(f"--- process {i} (exit {p.returncode}) stdout:\n{o}\n--- process {i} stderr:\n{e}"
                       for i, (p, (o, e)) in enumerate(zip(procs, outputs)))
    raise AssertionError(f"{failure}\n{report}")
  return [o for o, _ in outputs]


def _wait(procs: list[subprocess.Popen], timeout: float) -> str:
  """Waits for all; returns "" on success, else why, having stopped the processes still running."""
  deadline = time.monotonic() + timeout
  failure = ""
  while any(p.poll() is None for p in procs):
    failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
    if failed:
      failure = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
      break
    if time.monotonic() > deadline:
      failure = f"timed out after {timeout:.0f} s"
      break
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  if not failure and any(p.returncode for p in procs):
    failure = f"exit codes {[p.returncode for p in procs]}"
  return failure
