"""What a page fault costs on this host, for 4 KiB and 2 MiB pages, after memory sat free for a while;
prints one JSON line. It shows why a run's huge-page trial (llm_jax/host_memory.py) decides as it does.

  .venv/bin/python scripts/bench_host_memory.py [--size-mib 64] [--gaps 0,1,3] [--repeats 3]

XLA on CPU frees and re-allocates its buffers every step, so a step faults them back in. With
glibc's huge-page tunable those faults come in 2 MiB pages: far fewer of them, which is why
`llm-jax` asks for it. But a virtual machine whose balloon driver reports free memory to the host
(Linux's free page reporting, which reports free blocks of 2 MiB and up) gets those blocks taken
back by the host once they sit free, and the next 2 MiB fault waits for the host to supply the
memory again. So the cost depends on how long memory stays free, which for XLA is about one step.

For each gap, the script maps --size-mib of anonymous memory, touches it, unmaps it, waits the gap,
then times mapping and touching the same size again, once with 4 KiB pages and once with 2 MiB
pages (`madvise(MADV_HUGEPAGE)`); medians of --repeats. `huge_slower_after_s` is the shortest gap
at which 2 MiB pages cost more than 4 KiB ones (null if none did): a training run whose step takes
longer than that is likely to lose time with huge pages on this machine, and its trial to turn
them off, and one with shorter steps to gain. `huge_pages_granted` says whether the kernel backed the 2 MiB
mapping with huge pages at all.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_train  # noqa: E402  scripts/bench_train.py, for the CPU's name

from llm_jax import host_memory  # noqa: E402

PAGE = 4096
REPORTING = pathlib.Path("/sys/module/page_reporting/parameters")


def fault_in_ms(size: int, huge: bool) -> tuple[float, bool]:
  """Milliseconds to map and touch `size` fresh bytes, and whether any of them came in huge pages.

  The process's huge pages are counted before and after, since JAX and numpy hold some of their own.
  """
  huge_before = anon_huge_kib()
  start = time.perf_counter()
  block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  if huge:
    block.madvise(mmap.MADV_HUGEPAGE)
  for offset in range(0, size, PAGE):
    block[offset] = 1
  elapsed = (time.perf_counter() - start) * 1e3
  granted = huge and anon_huge_kib() > huge_before
  block.close()
  return elapsed, granted


def anon_huge_kib() -> int:
  with open("/proc/self/smaps_rollup", encoding="utf-8") as f:
    return sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages"))


def free_page_reporting() -> dict:
  """The kernel's free page reporting settings, where the kernel exposes them (a VM's balloon driver)."""
  if not REPORTING.is_dir():
    return {}
  fields = {}
  for name in ("page_reporting_order", "reported_kib"):
    path = REPORTING / name
    if path.exists():
      fields[name] = int(path.read_text())
  return fields


def measure(size: int, gaps: list[float], repeats: int) -> dict:
  costs, granted = {}, False
  for gap in gaps:
    runs = {"small": [], "huge": []}
    for _ in range(repeats):
      for kind in runs:
        fault_in_ms(size, kind == "huge")  # memory of this size, then freed: what a step leaves behind
        time.sleep(gap)
        elapsed, got_huge = fault_in_ms(size, kind == "huge")
        runs[kind].append(elapsed)
        granted = granted or got_huge
    costs[str(gap)] = {kind: round(statistics.median(times), 1) for kind, times in runs.items()}
  slower = [gap for gap in gaps if costs[str(gap)]["huge"] > costs[str(gap)]["small"]]
  return {"fault_in_ms_after_gap_s": costs, "huge_slower_after_s": min(slower) if slower else None,
          "huge_pages_granted": granted}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size-mib", type=int, default=64)
  parser.add_argument("--gaps", default="0,1,3", help="seconds the memory sits free before it is touched again")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  result = measure(args.size_mib << 20, [float(g) for g in args.gaps.split(",")], args.repeats)
  print(json.dumps({"size_mib": args.size_mib, **result, "free_page_reporting": free_page_reporting(),
                    "huge_pages_available": host_memory.huge_pages_available(),
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "cpu": bench_train.cpu_model()}))


if __name__ == "__main__":
  main()
