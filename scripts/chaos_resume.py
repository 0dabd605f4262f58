"""Chaos run: SIGKILL training at N seeded random moments, resume each time, compare every loss bitwise.

  .venv/bin/python scripts/chaos_resume.py [--kills 10] [--seed 0] [--steps 200] [--workdir DIR] [--data PATH]

A resume that is exact after one clean kill can still break under kills that land anywhere: during
start-up (restore, compile), between steps, or inside an asynchronous checkpoint save. This script
first trains a tiny GPT uninterrupted (WORKDIR/straight), then trains the same command in
WORKDIR/chaos, killing it with SIGKILL and rerunning the same `llm-jax train` command after each
kill (it resumes by itself from the latest complete checkpoint, or starts over from step 0 when
there is none), until the run reaches its last step. The kills fall at distinct random steps of
the run: about 30% wait for the next save after their step (a `*.orbax-checkpoint-tmp` folder
appearing), the rest come a random fraction of a step after their step is logged, except 10% that
ignore their step and come at a random moment of an attempt's start-up (restore, compile). A kill
counts as inside a save when a tmp folder that the killed attempt wrote is still there after it
died. Then the last record of each step in the chaos run (what it wrote after its last resume) is
compared with the uninterrupted run's.

Prints one JSON line, e.g. {"kills": 10, "resumes": 10, "kills_inside_saves": 3, "steps_compared": 200,
"bitwise_equal": true, "cpu": "..."}, and exits 1 when any loss or gradient norm differs, 2 when a
run fails by itself (the last lines of its stderr are printed) or the kills could not all be placed.
Each attempt's output is in WORKDIR/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT_EVERY = 5
ATTEMPT_TIMEOUT_S = 600
POLL_S = 0.005  # a tiny model's save keeps its tmp folder for 0.1-1 s


class ChaosError(Exception):
  """A run failed by itself, or the plan could not be carried out; the message says which and why."""


def train_command(workdir: pathlib.Path, data: pathlib.Path, steps: int) -> list[str]:
  """A tiny model on 2 CPU devices (as tests/test_train_loop.py's), logging every step and saving every
  CHECKPOINT_EVERY steps; no curves.png, whose drawing only lengthens each attempt's end."""
  return [sys.executable, "-m", "llm_jax", "train", "--config", str(REPO / "configs/tiny_shakespeare.py"),
          "--workdir", str(workdir), f"data.source=text:{data}", "data.text_split=blank_line",
          "model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=4", "model.d_ff=256",
          "data.seq_len=64", "model.max_len=64", "train.batch_size=16", "optim.warmup_steps=5",
          "optim.learning_rate=3e-3", "sample.max_new_tokens=16", f"train.steps={steps}", "train.log_every=1",
          "train.eval_every=0", f"train.checkpoint_every={CHECKPOINT_EVERY}", "mesh.cpu_devices=2", "train.curves=false"]


class Attempt:
  """One `llm-jax train` process, its stdout and stderr in files (so a failure can be shown afterwards)."""

  def __init__(self, command: list[str], logs: pathlib.Path, name: str):
    logs.mkdir(parents=True, exist_ok=True)
    self.out, self.err = logs / f"{name}.out", logs / f"{name}.err"
    env = {**os.environ, "CI": "true", "PYTHONUNBUFFERED": "1"}  # plain lines, written as they happen
    with self.out.open("w") as out, self.err.open("w") as err:
      self.process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
    self.started = time.perf_counter()
    self._read, self._last_step = 0, 0

  def alive(self) -> bool:
    if time.perf_counter() - self.started > ATTEMPT_TIMEOUT_S:
      self.process.kill()
      raise ChaosError(f"{self.out.stem} ran past {ATTEMPT_TIMEOUT_S} s\n{self.tail()}")
    return self.process.poll() is None

  def last_step(self) -> int:
    """The last step this attempt logged (0 before its first); reads only what is new, as it is asked every few ms."""
    with self.out.open("rb") as out:
      out.seek(self._read)
      new = out.read()
    complete = new[:new.rfind(b"\n") + 1]
    self._read += len(complete)
    for line in complete.splitlines():
      if line.startswith(b"step "):
        self._last_step = int(line.split()[1])
    return self._last_step

  def resumed_from(self) -> int | None:
    """The step it resumed from: 0 when it found no complete checkpoint, None when killed before it said."""
    lines = self.out.read_text().splitlines()
    for line in lines:
      if "resuming from step " in line:
        return int(line.split("resuming from step ")[1].split()[0])
    return 0 if any(line.startswith("step ") for line in lines) else None

  def finish(self) -> None:
    """Waits for a clean exit; any other ending is the trainer's failure, shown with its stderr."""
    while self.alive():
      time.sleep(0.05)
    if self.process.returncode != 0:
      raise ChaosError(f"{self.out.stem} exited {self.process.returncode}\n{self.tail()}")

  def tail(self, lines: int = 30) -> str:
    err = self.err.read_text().splitlines()[-lines:]
    out = self.out.read_text().splitlines()[-5:]
    return "\n".join([f"--- last lines of {self.err} ---", *err, f"--- last lines of {self.out} ---", *out])


def tmp_folders(workdir: pathlib.Path) -> set[tuple]:
  """Each save folder in progress, by name, inode and mtime: a save rewriting a leftover of the same name is new."""
  folder = workdir / "checkpoints"
  if not folder.is_dir():
    return set()
  found = set()
  for path in folder.iterdir():
    try:
      if ".orbax-checkpoint-tmp" in path.name:
        found.add((path.name, path.stat().st_ino, path.stat().st_mtime_ns))
    except FileNotFoundError:  # renamed to its step as we looked
      pass
  return found


def read_metrics(workdir: pathlib.Path) -> dict[int, dict]:
  """The last record of each step: what the run wrote after its last resume (a kill may leave repeated steps)."""
  records = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    records[record["step"]] = record
  return records


def compare(expected: dict[int, dict], got: dict[int, dict]) -> int | None:
  """The first step whose loss or gradient norm differs in any bit (or that is missing); None when all agree."""
  for step in sorted(expected.keys() | got.keys()):
    if step not in expected or step not in got:
      return step
    if any(expected[step][key] != got[step][key] for key in ("loss", "grad_norm")):
      return step
  return None


def kill_plan(kills: int, steps: int, rng: random.Random) -> list[tuple[str, int]]:
  """(kind, step) of each kill, in order: 'save', 'startup' or 'step', at distinct random steps before the last.

  A 'startup' kill ignores its step; drawing one for it keeps the other kills' steps the same.
  """
  saves = max(1, round(0.3 * kills)) if kills else 0
  startups = round(0.1 * kills)
  kinds = ["save"] * saves + ["startup"] * startups + ["step"] * (kills - saves - startups)
  rng.shuffle(kinds)
  return list(zip(kinds, sorted(rng.sample(range(1, steps), kills))))


def kill_at(attempt: Attempt, kind: str, step: int, rng: random.Random, workdir: pathlib.Path, before: set[tuple],
            startup_s: float, step_s: float) -> bool:
  """SIGKILLs the attempt at a seeded moment of the given kind; True when it cut off a save (`before`: at launch).

  'startup': a random moment within `startup_s` (the straight run's launch to its first logged step).
  'step': once the attempt has logged `step` (or its first step, if it resumed past it), a random delay of
  up to `step_s` (the straight run's median step). Counting steps rather than seconds spreads the kills
  over the run (a process's first save takes as long as 20 steps) and lets none finish it early.
  'save': the same, then the moment a save's tmp folder appears or changes.
  """
  delay = rng.uniform(0, startup_s if kind == "startup" else step_s)
  moment, saves_seen = (attempt.started + delay if kind == "startup" else None), None
  while True:
    now = time.perf_counter()
    if moment is None and attempt.last_step() >= step:
      moment = now + delay
    due = moment is not None and now >= moment
    if due and kind == "save":
      saves_seen = tmp_folders(workdir) if saves_seen is None else saves_seen
      due = bool(tmp_folders(workdir) - saves_seen)
    if due:
      break
    if not attempt.alive():
      attempt.finish()  # raises if it failed by itself
      raise ChaosError(f"{attempt.out.stem} finished before its '{kind}' kill at step {step}")
    time.sleep(POLL_S)
  attempt.process.send_signal(signal.SIGKILL)
  attempt.process.wait()
  return bool(tmp_folders(workdir) - before)


def wait_for_step(attempt: Attempt, step: int) -> float:
  """The moment the attempt has logged `step` (or ended)."""
  while attempt.last_step() < step and attempt.alive():
    time.sleep(0.01)
  return time.perf_counter()


def chaos(root: pathlib.Path, data: pathlib.Path, steps: int, kills: int, seed: int) -> dict:
  logs = root / "logs"
  straight = Attempt(train_command(root / "straight", data, steps), logs, "straight")
  startup_s = wait_for_step(straight, 1) - straight.started
  straight.finish()
  expected = read_metrics(root / "straight")
  step_s = statistics.median(record["step_time_s"] for record in expected.values())

  rng = random.Random(seed)
  workdir, command = root / "chaos", train_command(root / "chaos", data, steps)
  inside_saves, resumed_from, plan = 0, [], kill_plan(kills, steps, rng)
  for number, (kind, step) in enumerate(plan):
    before = tmp_folders(workdir)
    attempt = Attempt(command, logs, f"chaos_{number:02d}")
    inside_saves += kill_at(attempt, kind, step, rng, workdir, before, startup_s, step_s)
    if number:  # every attempt after the first is a resume
      resumed_from.append(attempt.resumed_from())
  last = Attempt(command, logs, f"chaos_{kills:02d}")
  last.finish()
  if kills:
    resumed_from.append(last.resumed_from())
  got = read_metrics(workdir)
  first_difference = compare(expected, got)
  kinds = [kind for kind, _ in plan]
  return {"kills": kills, "resumes": len(resumed_from), "kills_inside_saves": inside_saves,
          "kinds": {k: kinds.count(k) for k in ("save", "startup", "step")}, "resumed_from_steps": resumed_from,
          "steps_compared": len(expected.keys() & got.keys()), "bitwise_equal": first_difference is None,
          "first_difference": first_difference, "cpu": cpu_name()}


def cpu_name() -> str:
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  import platform
  return platform.processor() or "unknown"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", type=pathlib.Path, default=REPO.parent / "shared/data/tiny_shakespeare/input.txt")
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0, help="chooses the kinds and the moments of the kills")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--workdir", type=pathlib.Path, help="an empty or new folder, kept; default a temporary one")
  args = parser.parse_args()
  root = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="chaos_resume_"))
  if root.exists() and any(root.iterdir()):
    sys.exit(f"chaos_resume: {root} is not empty; pass a new --workdir")
  try:
    result = chaos(root.absolute(), args.data.absolute(), args.steps, args.kills, args.seed)
  except ChaosError as e:
    print(f"chaos_resume: {e}\nchaos_resume: the runs are in {root}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result))
  if not result["bitwise_equal"]:
    print(f"chaos_resume: step {result['first_difference']} differs; the runs are in {root}", file=sys.stderr)
    sys.exit(1)
  if args.workdir is None:
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
