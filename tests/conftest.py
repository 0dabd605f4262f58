"""Test setup: 8 simulated CPU devices, fast compiles, strict rank promotion and one compilation cache, before jax is
imported."""

import atexit
import os
import pathlib
import shutil
import tempfile

from jax_processes import FAST_COMPILE  # tests/jax_processes.py (imports no jax)

# FAST_COMPILE: LLVM's optimisation level 0 for the code XLA emits, and XLA's older elemental emitters for
# fusions. The tests' models are tiny, so their time goes to compiling, not running: a tiny `llm-jax train`
# (4 steps, an eval, a sample) took 20.2 CPU-seconds with XLA's defaults, 14.2 at level 0 and 11.2 with both
# (its compiles 8.8 s -> 5.3 s -> 3.1 s; AMD EPYC, 2 cores). Both change how fast the kernels run, not what
# they compute (no fast-math either way); every process a test starts inherits them. Speed is measured by
# scripts/, never here.
# (xdist's workers inherit the flags of the process that starts them and run this file again: nothing twice.)
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in ("--xla_force_host_platform_device_count=8", *FAST_COMPILE)
                                             if f not in _flags])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test session, inherited by every process a test starts:
# dozens of real CLI runs (kill and resume, several processes) compile the same tiny train step, and
# a hit loads the executable XLA would build again, the same code (it halved a kill-and-resume test).
# A fresh folder each session, so no run ever sees another run's entries.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llm-jax-tests-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

from llm_jax import distributed  # noqa: E402  (imports jax; XLA reads its flags when the backend starts, later)

# Eight devices on two busy cores: XLA's 40 s watchdog on a collective's stragglers is raised, as
# `mesh.cpu_devices` raises it for users (llm_jax/distributed.py says why).
os.environ["XLA_FLAGS"] = distributed.with_collective_watchdog(os.environ["XLA_FLAGS"])

import jax  # noqa: E402  (must follow the XLA_FLAGS above)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("LLM_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data beside the clone: skipped in a user's clone without it, required in CI."""
  if not SHARED_DATA.is_dir():
    if os.environ.get("CI") == "true":
      pytest.fail(f"{SHARED_DATA} is missing; CI must run with ../shared beside the clone")
    pytest.skip(f"{SHARED_DATA} not found (the shared corpora sit beside the repo in CI)")
  return SHARED_DATA
