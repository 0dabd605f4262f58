"""Joining several processes into one JAX runtime (multi-host TPU/GPU, or localhost tests).

Called once, before any other JAX call, by every command that builds a mesh. Three ways in:
an explicit `mesh.coordinator_address` (+ `mesh.num_processes`, `mesh.process_id`), the same
three through jax's environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), or jax's automatic detection on TPU VMs and SLURM. With none of them the
run is a single process and nothing is initialized.
"""

from __future__ import annotations

import os

import jax

from llm_jax.config import MeshConfig

_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(mesh: MeshConfig) -> None:
  """Initializes `jax.distributed` when the config or the environment asks for it."""
  if jax.distributed.is_initialized():
    return
  address = mesh.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if address:
    num = mesh.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None
    pid = mesh.process_id if mesh.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    jax.distributed.initialize(address, num_processes=num, process_id=None if pid < 0 else pid)
  elif any(name in os.environ for name in _CLUSTER_ENV):
    jax.distributed.initialize()  # jax detects TPU VMs and SLURM allocations itself
