"""The JAX runtime a mesh runs on: the CPU device count, and several processes joined into one.

Called once, before any other JAX call, by every command that builds a mesh. First
`mesh.cpu_devices` splits a CPU host into that many XLA devices. Then processes join
(multi-host TPU/GPU, or localhost tests), three ways in: an explicit `mesh.coordinator_address`
(+ `mesh.num_processes`, `mesh.process_id`), the same three through jax's environment variables
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or jax's automatic detection on
TPU VMs and SLURM. With none of them the run is a single process and nothing is initialized.
"""

from __future__ import annotations

import os

import jax

from llm_jax.config import ConfigError, MeshConfig

# LLM_JAX_CLUSTER: set (to anything) where jax's detection works but nothing in the environment says so,
# e.g. on Cloud TPU VMs made by `tpu-vm create`, whose workers jax finds from GCE metadata (scripts/launch/tpu_vm.sh).
_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "LLM_JAX_CLUSTER")

# The devices of one CPU host share its cores, so on a busy host one device can reach a collective long after
# the other; XLA's watchdog ends the process after 40 s of such waiting ("Exiting to ensure a consistent program
# state"), which killed the main job at step 650 on a 2-core machine running the test suite beside it. A real
# hang still ends, after 10 minutes. A value the user puts in XLA_FLAGS wins.
COLLECTIVE_WATCHDOG = "--xla_cpu_collective_call_terminate_timeout_seconds"
COLLECTIVE_WATCHDOG_SECONDS = 600


def with_collective_watchdog(xla_flags: str) -> str:
  """`xla_flags` (an XLA_FLAGS value) with the watchdog raised, unless they set it already."""
  if COLLECTIVE_WATCHDOG in xla_flags:
    return xla_flags
  return f"{xla_flags} {COLLECTIVE_WATCHDOG}={COLLECTIVE_WATCHDOG_SECONDS}".strip()


def initialize(mesh: MeshConfig) -> None:
  """Sets the CPU device count, then initializes `jax.distributed` when config or environment ask."""
  set_cpu_devices(mesh.cpu_devices)
  if jax.distributed.is_initialized():
    return
  address = mesh.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if address:
    num = mesh.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None
    pid = mesh.process_id if mesh.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    jax.distributed.initialize(address, num_processes=num, process_id=None if pid < 0 else pid)
  elif any(name in os.environ for name in _CLUSTER_ENV):
    jax.distributed.initialize()  # jax detects TPU VMs and SLURM allocations itself


def set_cpu_devices(count: int) -> None:
  """`mesh.cpu_devices`: how many XLA devices each CPU host becomes (0 leaves XLA's one).

  Why: one CPU device spreads every op over all cores, and the step's many small and
  memory-bound ops split poorly; two devices each running half the batch (data parallel) took
  the gpt-10m step on 2 cores from 0.68 s to 0.63 s (docs/benchmarks.md). A single-device matmul
  still uses every core, so the CPU peak that MFU is measured against does not change.
  Accelerator hosts are unaffected: their meshes are made of the accelerators.
  """
  if not count:
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
    if count > 1:  # XLA reads its flags when the backend starts, after this
      os.environ["XLA_FLAGS"] = with_collective_watchdog(os.environ.get("XLA_FLAGS", ""))
  except RuntimeError:  # JAX has started its backends: fine if they already have that many
    have = len(jax.devices("cpu"))
    if have != count:
      raise ConfigError(f"mesh.cpu_devices={count}, but JAX already runs with {have} CPU devices; set it in a "
                        "fresh process, before any JAX computation") from None
