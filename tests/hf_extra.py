"""The hf extra (torch, transformers, safetensors) for the tests that compare with transformers."""

import importlib
import os

import pytest


def hf_extra(name: str):
  """A module of the hf extra: a user's clone without it skips these tests, CI (CI=true) fails on it.

  Skipping in CI would let a broken install pass every parity check by running none of them.
  """
  if os.environ.get("CI") == "true":
    try:
      return importlib.import_module(name)
    except ImportError as e:
      pytest.fail(f"CI=true but the hf extra is not installed ({e}); install it: pip install -e '.[hf]'",
                  pytrace=False)
  return pytest.importorskip(name, reason=f"the hf extra ({name}) is needed to compare with transformers")
