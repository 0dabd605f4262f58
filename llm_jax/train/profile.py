"""A `jax.profiler` trace of a window of train steps (`train.profile_steps=START:END`, `llm-jax train --profile`).

The trace goes to WORKDIR/profile/plugins/profile/<time>/ (WORKDIR/profile/process_I/... for each
process of a multi-process run): `<host>.xplane.pb` for TensorBoard's profile plugin
(`tensorboard --logdir WORKDIR/profile`) and `perfetto_trace.json.gz` for ui.perfetto.dev. Each
traced step is a `train` step annotation holding the `jit_train_step` module's ops.

Outside the window the loop pays two integer comparisons a step; the trace waits for the device
only at its own two ends (for the steps before it to finish, and for its last step's ops), never
on another step.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any, Callable

import jax

from llm_jax.config import parse_profile_steps

DEFAULT_SKIP = 5  # --profile: steps left to compilation and warm-up before the trace starts
DEFAULT_LENGTH = 5  # --profile: steps traced


def window(profile_steps: str, default: bool, start: int, total: int) -> tuple[int, int] | None:
  """The steps to trace in a run that goes from step `start` + 1 to `total`.

  `default` (--profile, when train.profile_steps is empty) traces DEFAULT_LENGTH steps after the
  first DEFAULT_SKIP of this run (compilation lands in its first step), or the run's later steps
  when it is shorter. A window wholly before `start` (a resumed run) traces nothing.
  """
  steps = parse_profile_steps(profile_steps)
  if steps is None and default:
    first = start + 1 + DEFAULT_SKIP if total - start > DEFAULT_SKIP else start + min(2, total - start)
    steps = first, min(first + DEFAULT_LENGTH - 1, total)
  if steps is None or steps[1] <= start:
    return None
  return max(steps[0], start + 1), min(steps[1], total)


class Tracer:
  """Starts the trace before step `first` is dispatched and stops it once step `last` has run.

  Use `step(n, state)` around each step's dispatch and `after(n, new_state)` after it; `close()`
  ends a trace that a stop or an error left open. The trace starts when the steps before the
  window have run, so it holds the window's steps and no others.
  """

  def __init__(self, steps: tuple[int, int] | None, workdir: pathlib.Path, say: Callable[[str], None]):
    self.first, self.last = steps or (0, -1)
    self._say = say
    self.directory = workdir / "profile"
    if jax.process_count() > 1:  # processes on one host would write the same <host>.xplane.pb
      self.directory = self.directory / f"process_{jax.process_index()}"
    self._open = False

  def step(self, step: int, state: Any) -> contextlib.AbstractContextManager:
    if not self.first <= step <= self.last:
      return contextlib.nullcontext()
    if step == self.first:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self._open = True
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def after(self, step: int, state: Any) -> None:
    if step == self.last and self._open:
      jax.block_until_ready(state)  # the last traced step's ops, not only their dispatch
      self.close()
      self._say(f"llm-jax: profile of steps {self.first}-{self.last} written to {self.directory} (tensorboard "
                f"--logdir {self.directory}, or its perfetto_trace.json.gz in ui.perfetto.dev)")

  def close(self) -> None:
    if self._open:
      self._open = False
      jax.profiler.stop_trace()
