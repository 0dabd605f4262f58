"""Host memory for XLA on CPU: ask glibc's malloc for transparent huge pages.

Why: XLA's CPU runtime allocates every activation and gradient buffer afresh each step, and
glibc serves buffers this large with `mmap` and unmaps them on free, so every step faults its
whole working set back in, 4 KiB at a time. On the gpt-10m benchmark that was about 89,000
page faults and 0.14 s of kernel time a step (of 0.84 s). glibc's `glibc.malloc.hugetlb=1`
tunable (glibc 2.35 and later) marks those mappings for 2 MiB pages: about 450 faults a step,
and the step took 0.73-0.76 s (docs/benchmarks.md). Accelerator hosts gain nothing and lose
nothing from it.

On a VM whose balloon driver reports free memory to the host, a 2 MiB page that sat free for a
few seconds is refaulted from the host, at about 100x the cost of a reused one. XLA's buffers sit
free for about a step, so there the tunable helps short steps and costs long ones (on one such
machine it took the main job's step to 0.80 of its time without it, and gpt-10m's to 1.11).
Which of the two a run is depends on its model, batch and host, so no constant can choose: a
run on CPU measures it (`HugePageTrial`). Its first logged intervals alternate with and without
huge pages, through the kernel's per-process switch (`prctl(PR_SET_THP_DISABLE)`, which applies
from the next page fault on), and the faster setting stays for the rest of the run.
`scripts/bench_host_memory.py` shows how long a machine's host leaves free memory alone.

A tunable is read only when a process starts, so the command-line entry points re-execute
themselves once with it set, before JAX is imported. A user's own GLIBC_TUNABLES is left as it
is (and measured, if it asks for huge pages). LLM_JAX_HUGE_PAGES=0 turns the re-execution off;
LLM_JAX_HUGE_PAGES=1 keeps huge pages without a trial.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import statistics
import sys
from collections.abc import Callable

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
  """glibc 2.35+ (the first with the tunable) and a kernel whose THP mode is not `never`."""
  try:
    libc = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; absent on musl and macOS
    mode = _THP_SETTING.read_text()
  except (ValueError, OSError):
    return False
  if not libc or not libc.startswith("glibc "):
    return False
  major, minor = (int(x) for x in libc.split()[1].split(".")[:2])
  return (major, minor) >= (2, 35) and "[never]" not in mode


def reexec_with_huge_pages() -> None:
  """Restart this program with TUNABLE set, unless it is set, refused, or unavailable.

  Call it first thing in a command-line entry point: the process image is replaced, so
  nothing done before it survives.
  """
  if (os.environ.get("LLM_JAX_HUGE_PAGES", "1") == "0" or "GLIBC_TUNABLES" in os.environ
      or not huge_pages_available()):
    return
  env = dict(os.environ, GLIBC_TUNABLES=TUNABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


_PR_SET_THP_DISABLE, _PR_GET_THP_DISABLE = 41, 42  # <linux/prctl.h>


def _prctl(option: int, value: int = 0) -> int:
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(option, value, 0, 0, 0)
  except (OSError, AttributeError):  # not Linux
    return -1


def allow_huge_pages(allow: bool) -> bool:
  """Lets this process's next page faults take huge pages, or not; False where the kernel has no switch.

  Unlike the tunable, the switch works while the process runs, and children inherit it.
  """
  return _prctl(_PR_SET_THP_DISABLE, 0 if allow else 1) == 0


def huge_pages_allowed() -> bool:
  return _prctl(_PR_GET_THP_DISABLE) == 0


def asked_for() -> bool:
  """Whether this process's malloc asks for huge pages (the tunable is set, by us or by the user)."""
  return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


class HugePageTrial:
  """Keeps huge pages for a run only if its own steps are faster with them (the module's docstring).

  Feed it each logged interval's seconds a step. It skips the first interval (in a run, it holds
  the compilation), then alternates with and without huge pages for `pairs` pairs of intervals,
  and keeps them if the median of the pairs' ratios (with over without) is at most 1, saying so
  through `say`. Ratios of neighbouring intervals, rather than two medians, because a shared
  machine's speed drifts over minutes. It is active only where malloc asks for huge pages, the
  kernel has the switch and LLM_JAX_HUGE_PAGES is not set to 1.
  """

  def __init__(self, say: Callable[[str], None], pairs: int = 3, active: bool = True, skip_first: bool = True):
    self._say, self._pairs = say, pairs
    self.active = (active and asked_for() and os.environ.get("LLM_JAX_HUGE_PAGES") != "1"
                   and allow_huge_pages(True))
    self.times: dict[bool, list[float]] = {True: [], False: []}
    self.kept: bool | None = None
    self._skipped = not skip_first

  def observe(self, step_time: float) -> None:
    if not self.active:
      return
    if not self._skipped:
      self._skipped = True
      return
    current = huge_pages_allowed()
    self.times[current].append(step_time)
    if len(self.times[False]) < self._pairs:
      allow_huge_pages(not current)
      return
    ratio = statistics.median(a / b for a, b in zip(self.times[True], self.times[False]))
    self.kept, self.active = ratio <= 1, False
    allow_huge_pages(self.kept)
    self._say(f"llm-jax: huge pages {'kept' if self.kept else 'turned off'} for this run: a step took {ratio:.2f} "
              f"of its time without them (median of {self._pairs} alternated pairs; llm_jax/host_memory.py)")
