"""scripts/chaos_resume.py through its real command: a run SIGKILLed three times ends with bitwise its losses.

This is the suite's single-process kill-and-resume test: the kills land after a logged step, inside a save
and during start-up, and at least one attempt resumes from a committed checkpoint (multi-process kills and
resumes are in tests/test_multiprocess_resume.py).
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import chaos_resume  # noqa: E402  (scripts/chaos_resume.py)


@pytest.mark.slow
def test_three_kills_resume_to_bitwise_equal_losses(shared_data, tmp_path):
  root = tmp_path / "chaos"
  result = subprocess.run([sys.executable, str(REPO / "scripts/chaos_resume.py"), "--kills", "3", "--steps", "40",
                           "--seed", "0", "--workdir", str(root),
                           "--data", str(shared_data / "tiny_shakespeare/input.txt")],
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["kills"] == 3 and report["resumes"] == 3 and len(report["resumed_from_steps"]) == 3
  assert report["kinds"]["save"] >= 1 and sum(report["kinds"].values()) == 3
  # At least one attempt resumed from a committed checkpoint (not from step 0): the clean kill-and-resume case.
  assert any(step and step >= chaos_resume.CHECKPOINT_EVERY for step in report["resumed_from_steps"])
  assert report["bitwise_equal"] and report["first_difference"] is None and report["steps_compared"] == 40

  # What is on disk agrees: three attempts died before their end-of-run sample, the fourth finished the run.
  outs = [path.read_text() for path in sorted((root / "logs").glob("chaos_*.out"))]
  assert len(outs) == 4 and ["--- sample ---" in out for out in outs] == [False, False, False, True]
  expected, got = chaos_resume.read_metrics(root / "straight"), chaos_resume.read_metrics(root / "chaos")
  assert sorted(got) == sorted(expected) == list(range(1, 41))
  assert all(got[s]["loss"] == expected[s]["loss"] and got[s]["grad_norm"] == expected[s]["grad_norm"] for s in got)

  # The comparison sees a one-ulp change in one loss and a missing step.
  got[17]["loss"] = float(np.nextafter(np.float32(got[17]["loss"]), np.float32(np.inf)))
  assert chaos_resume.compare(expected, got) == 17
  del got[17]
  assert chaos_resume.compare(expected, got) == 17
