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
It stays on by default for the main job;
`scripts/bench_host_memory.py` tells a user of long steps whether to set LLM_JAX_HUGE_PAGES=0.

A tunable is read only when a process starts, so the command-line entry points re-execute
themselves once with it set, before JAX is imported. A user's own GLIBC_TUNABLES is left as it
is, and LLM_JAX_HUGE_PAGES=0 turns the re-execution off.
"""

from __future__ import annotations

import os
import pathlib
import sys

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
