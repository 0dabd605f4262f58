"""The CLI's re-execution with glibc's huge-page tunable (llm_jax/host_memory.py), the run's trial that keeps
it or not, and the benchmark that says whether a machine gains from it, in real processes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from llm_jax import host_memory

# Mallocs and touches 64 MiB (through libc itself: numpy asks for huge pages on its own) and
# prints how much anonymous memory sits in huge pages.
MALLOC = """
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 * 2**20)
ctypes.memset(block, 1, 64 * 2**20)
huge_kb = sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
print("huge_mb", huge_kb // 1024)
"""

# Prints a marker, re-executes, then mallocs.
CHILD = """
import ctypes, os
from llm_jax import host_memory
print("started", flush=True)
host_memory.reexec_with_huge_pages()
print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
""" + MALLOC

# Feeds a trial the step times of argv, printing the kernel's switch after each, then mallocs.
TRIAL = """
import ctypes, json, sys
from llm_jax import host_memory
said = []
trial = host_memory.HugePageTrial(said.append)
allowed = [host_memory.huge_pages_allowed()]
for step_time in map(float, sys.argv[1:]):
  trial.observe(step_time)
  allowed.append(host_memory.huge_pages_allowed())
print("trial", json.dumps({"active": trial.active, "allowed": allowed, "kept": trial.kept, "said": said}))
""" + MALLOC

needs_huge_pages = pytest.mark.skipif(not host_memory.huge_pages_available(),
                                      reason="needs glibc >= 2.35 and transparent huge pages not set to never")


def run_child(*args, code: str = CHILD, **env) -> dict:
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LLM_JAX_HUGE_PAGES")}
  out = subprocess.run([sys.executable, "-c", code, *args], env={**base, **env}, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split("\n")
  fields = dict(line.split(" ", 1) if " " in line else (line, "") for line in out if line)
  fields["starts"] = out.count("started")
  return fields


@needs_huge_pages
def test_reexec_once_and_large_buffers_get_huge_pages():
  child = run_child()
  assert child["starts"] == 2  # the original process and its one re-execution, no loop
  assert child["tunables"] == host_memory.TUNABLE
  assert int(child["huge_mb"]) >= 32


@needs_huge_pages
@pytest.mark.parametrize("env", [{"LLM_JAX_HUGE_PAGES": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}],
                         ids=["opted-out", "user-tunables"])
def test_no_reexec_when_opted_out_or_tunables_set(env):
  child = run_child(**env)
  assert child["starts"] == 1
  assert child["tunables"] == env.get("GLIBC_TUNABLES", "")
  with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
    madvise_only = "[madvise]" in f.read()
  if madvise_only:  # the kernel then gives huge pages only where malloc asks for them
    assert int(child["huge_mb"]) < 32


@needs_huge_pages
@pytest.mark.parametrize("times, kept, ratio", [(("9", "1", "2", "1", "2", "3", "2"), True, "0.50"),
                                                (("9", "2", "1", "1", "2", "3", "2"), False, "1.50")],
                         ids=["faster-with", "faster-without"])
def test_trial_alternates_then_keeps_the_faster_setting(times, kept, ratio):
  """The first interval (the compilation's) is skipped; then with, without, three times over, and the
  median of the pairs' ratios decides; the kernel's switch really changes the page size a malloc gets."""
  child = run_child(*times, code=TRIAL, GLIBC_TUNABLES=host_memory.TUNABLE)
  trial = json.loads(child["trial"])
  assert trial["allowed"] == [True, True, False, True, False, True, False, kept]
  assert trial["kept"] is kept and not trial["active"]
  assert trial["said"] == [f"llm-jax: huge pages {'kept' if kept else 'turned off'} for this run: a step took "
                           f"{ratio} of its time without them (median of 3 alternated pairs; llm_jax/host_memory.py)"]
  assert (int(child["huge_mb"]) >= 32) is kept


@needs_huge_pages
@pytest.mark.parametrize("env", [{}, {"GLIBC_TUNABLES": host_memory.TUNABLE, "LLM_JAX_HUGE_PAGES": "1"}],
                         ids=["no-tunable", "kept-by-user"])
def test_no_trial_without_the_tunable_or_when_the_user_keeps_huge_pages(env):
  trial = json.loads(run_child("9", "2", "1", "2", "1", "2", "1", code=TRIAL, **env)["trial"])
  assert trial == {"active": False, "allowed": [True] * 8, "kept": None, "said": []}


@needs_huge_pages
def test_fault_cost_benchmark_times_both_page_sizes():
  """scripts/bench_host_memory.py, which shows why a run keeps huge pages or not, really gets 2 MiB pages
  for its huge-page mapping and reports a cost for each page size after each gap."""
  script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_host_memory.py"
  out = subprocess.run([sys.executable, str(script), "--size-mib", "8", "--gaps", "0,0.1", "--repeats", "1"],
                       capture_output=True, text=True, timeout=120, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result["huge_pages_granted"] and result["huge_pages_available"]
  assert set(result["fault_in_ms_after_gap_s"]) == {"0.0", "0.1"}
  assert all(cost["small"] > 0 and cost["huge"] > 0 for cost in result["fault_in_ms_after_gap_s"].values())
  assert result["huge_slower_after_s"] in (None, 0.0, 0.1)
