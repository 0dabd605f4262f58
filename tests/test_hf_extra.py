"""tests/test_hf.py without the hf extra: skipped in a user's clone, a failure in CI.

The extra is made missing the way Python itself marks a module that cannot be imported:
`sys.modules["torch"] = None` makes `import torch` raise ImportError, in a fresh pytest process.
"""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; import pytest; sys.exit(pytest.main(sys.argv[1:]))"


def collect_without_torch(ci: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "CI"}
  if ci:
    env["CI"] = ci
  return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "--collect-only", "-q", "-p", "no:cacheprovider",
                         str(REPO / "tests" / "test_hf.py")], cwd=REPO, capture_output=True, text=True, env=env,
                        timeout=300)


def test_missing_hf_extra_fails_under_ci():
  result = collect_without_torch("true")
  assert result.returncode not in (0, 5), result.stdout[-2000:]  # 5: nothing collected, which passes silently
  assert "CI=true but the hf extra is not installed" in result.stdout, result.stdout[-2000:]
  assert "pip install -e '.[hf]'" in result.stdout


def test_missing_hf_extra_skips_outside_ci():
  result = collect_without_torch("")
  assert result.returncode in (0, 5), result.stdout[-2000:] + result.stderr[-2000:]
  assert "SKIPPED [1]" in result.stdout and "the hf extra (torch) is needed" in result.stdout, result.stdout[-2000:]
