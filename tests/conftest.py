"""Test setup: 8 simulated CPU devices and strict rank promotion, before jax is imported."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
