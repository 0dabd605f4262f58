"""What a run reports: metrics.jsonl, TensorBoard events, curves.png, a progress bar or plain lines, and MFU.

MFU = achieved training FLOP/s / peak FLOP/s, with the FLOPs per token of
`llm_jax.model.stats` (6 x (non-embedding + lm head params) + 12 x layers x seq_len x width).
The peak is a table of dense bf16 figures per accelerator kind, times the device count; on
CPU it is a float32 matmul rate measured once at start-up on this machine (all devices of a
simulated CPU mesh share the same cores, so the host rate is the peak, not rate x devices).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.train import plot

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}


def measure_matmul_flops(n: int = 1024, repeats: int = 10, dtype: Any = jnp.float32) -> float:
  """FLOP/s of a jitted n x n matmul on the default device: the CPU's achievable peak."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops() -> tuple[float, str]:
  """(peak FLOP/s of all devices, how it was obtained)."""
  device = jax.devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    return measure_matmul_flops(), "measured CPU float32 matmul rate"
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops * jax.device_count(), f"{device.device_kind} table peak x {jax.device_count()}"
  return float("nan"), f"unknown device kind {device.device_kind!r}: MFU not reported"


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch whenever it is installed (the hf and eval extras bring it), only to
  accept torch tensors; that cost every run 2.4 s of start-up on a 2-core CPU, and the trainer logs
  floats. A process that has already imported torch keeps it.
  """
  hidden = "torch" not in sys.modules
  if hidden:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hidden:
      del sys.modules["torch"]
  return SummaryWriter


def drop_records_after(path: str | pathlib.Path, step: int) -> int:
  """Removes the records of steps after `step` from a metrics.jsonl; returns how many went.

  A run killed after its last checkpoint logged steps that its resumed run logs again: keeping
  only what the checkpoint covers leaves one record per step. A line cut short by the kill
  goes too. The file is rewritten beside itself and renamed over, so a crash here loses nothing.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return 0
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
      kept.append(line + "\n")
    else:
      dropped += 1
  if dropped:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)
  return dropped


class Reporter:
  """Writes one record per logged step; only process 0 writes anything.

  In a terminal it draws a progress bar; in CI or a pipe it prints one plain line per record,
  which logs and CI output can be read from. A run that starts at `start_step` (a resume, or 0)
  first drops the records of later steps that a killed predecessor left in metrics.jsonl.
  WORKDIR/curves.png (train/plot.py) is redrawn in the background after each evaluation's
  record and once more at `close`, unless `curves` is False (train.curves).
  """

  def __init__(self, workdir: str | pathlib.Path, total_steps: int, start_step: int = 0, curves: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._bar = None
    self._tb = None
    self._curves = None
    self._draw = curves
    if not self.enabled:
      return
    drop_records_after(self.path, start_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = _summary_writer_class()(str(pathlib.Path(workdir) / "tensorboard"))
    if sys.stdout.isatty() and os.environ.get("CI") != "true":
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {k: _plain(v) for k, v in record.items()}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    step = record["step"]
    if self._curves is None and self._draw:
      self._curves = plot.Curves(self.path.parent, self.message)
    if "eval_loss" in record and self._curves is not None:
      self._curves.draw()
    for key, value in record.items():  # a NaN loss (skipped by the step's guard) stays in metrics.jsonl only
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                            tok_s=f"{record.get('tokens_per_sec', 0):,.0f}")
    else:
      print(format_record(record), flush=True)

  def message(self, text: str) -> None:
    if self.enabled:
      (self._bar.write if self._bar is not None else print)(text)

  def close(self) -> None:
    if self.enabled:
      if self._curves is not None:  # a run that wrote records: its final picture
        self._curves.close()
      self._file.close()
      self._tb.close()
      if self._bar is not None:
        self._bar.close()


def format_record(record: dict[str, Any]) -> str:
  parts = [f"step {record['step']}"]
  for key, value in record.items():
    if key != "step":
      parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
  return " | ".join(parts)


def _plain(value: Any) -> Any:
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    value = np.asarray(value).item()
  return value
