"""What a run's workdir is, and who holds it.

A training run writes a fixed set of names into its workdir (`RUN_FILES`). Three things depend
on knowing them: commands that write a folder of their own (`export`, `convert`) must refuse
one that holds a run, since they would overwrite its config.json and hide its checkpoints
behind a `params/` that `generate` and `llm_jax.load` read first; `--fresh` must clear all of
them, or an old export keeps being served; and two trainers in one folder would rotate each
other's checkpoints, so a lock file (`.lock`) names the process and host that hold it.

Nothing here imports jax: these checks run before the heavy imports. In a run of several
processes only process 0 takes the lock; the caller says which process it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import socket
import sys
import tempfile
import time
from typing import Iterator

from llm_jax.errors import UserError

# Everything a run, or an export or conversion into the same folder, writes there.
RUN_FILES = ("checkpoints", "damaged_checkpoints", "config.json", "metrics.jsonl", "tensorboard", "tokenizer.model",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "hf_config.json", "params", "checksums.json", "eval", "profile", "curves.png")
LOCK_NAME = ".lock"
_WRITE_GRACE_S = 10.0  # a lock file still empty after this long was left by a crash between create and write


class WorkdirError(UserError):
  """A folder that cannot take this command's output: a file, read-only, another run's, or in use."""


def holds_run(path: str | pathlib.Path) -> bool:
  """True when `path` holds a training run: a checkpoints/ folder, or a config.json beside metrics.jsonl."""
  path = pathlib.Path(path)
  return (path / "checkpoints").is_dir() or ((path / "config.json").is_file() and (path / "metrics.jsonl").is_file())


def check_writable(path: str | pathlib.Path, flag: str = "--workdir") -> None:
  """Raises unless `path` is a folder this process can write into, or one it can create.

  It tries a real write (a temporary file, removed at once) in the folder or in its nearest
  existing parent, because permission bits do not tell: root passes `os.access` on a
  read-only filesystem, and ACLs or quotas are invisible to it. `flag` names the option in
  the message. Nothing is left behind.
  """
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"{flag} {path} is a file, not a folder; pass a folder path (new or empty) or move the file")
  existing = path
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise WorkdirError(f"{flag} {path} cannot be created: {existing} is a file; pass a path under a folder")
  try:
    fd, probe = tempfile.mkstemp(prefix=".llm-jax-write-test-", dir=existing)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    where = f"{flag} {path}" if existing == path else f"{flag} {path} cannot be created: its parent {existing}"
    raise WorkdirError(f"{where} is not writable ({e.strerror or type(e).__name__}); fix its permissions "
                       f"or pass another {flag}") from None


def refuse_run_folder(out: str | pathlib.Path, command: str) -> None:
  """Raises when `command` must not write its folder at `out`; call it before writing anything.

  Refused: a file, a folder that holds a training run or lies inside one of its folders
  (RUN/checkpoints/x), and a place this process cannot write.
  """
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise WorkdirError(f"--out {out} is a file; {command} writes a folder: pass a new or empty folder path")
  if holds_run(out):
    raise WorkdirError(f"--out {out} holds a training run (checkpoints, config.json); {command} would overwrite its "
                       f"config.json and hide its checkpoints: pass another --out, e.g. {out}-export")
  for run in out.absolute().parents:  # inside a run's own folders (its checkpoints/, say) is just as bad
    part = out.absolute().relative_to(run).parts[0]
    if part in RUN_FILES and holds_run(run):
      raise WorkdirError(f"--out {out} lies inside {part} of the training run in {run}; {command} would mix its "
                         f"files into the run's: pass a folder outside {run / part}")
  check_writable(out, "--out")


def clear_run(workdir: str | pathlib.Path) -> list[str]:
  """`--fresh`: removes every name in RUN_FILES from `workdir`; returns the names removed.

  Other files the user keeps there stay. A stale lock goes too; a lock of this process stays
  (the trainer clears inside its own lock), and one of a live process elsewhere refuses: that
  run would lose its files under it.
  """
  workdir = pathlib.Path(workdir)
  holder = _read_lock(workdir / LOCK_NAME)
  if isinstance(holder, Holder) and not holder.is_mine():
    if holder.alive() is False:
      (workdir / LOCK_NAME).unlink(missing_ok=True)
    else:
      raise _in_use(workdir, holder)
  removed = []
  for name in RUN_FILES:
    path = workdir / name
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
      path.unlink()
    else:
      continue
    removed.append(name)
  return removed


# ---------------------------------------------------------------------------------------------
# The lock.

_MY_TOKENS: set[str] = set()  # locks this process holds: its own pid in a lock file is not proof


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a workdir: what `.lock` records."""

  pid: int
  host: str
  command: str
  token: str  # unique per acquisition: tells this lock from a dead one left with the same pid
  started: str = ""  # the process's start time (/proc): a reused pid is not the holder

  def is_mine(self) -> bool:
    return self.token in _MY_TOKENS

  def alive(self) -> bool | None:
    """Whether the holder still runs: None when it is on another host, which cannot be asked."""
    if self.host != socket.gethostname():
      return None
    if self.pid == os.getpid():
      return self.is_mine()  # our pid but not our token: a previous process that had our pid
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      pass  # it exists, under another user
    state, started = _proc_stat(self.pid)
    if state == "Z":  # killed, not yet reaped by its parent
      return False
    return not (self.started and started and started != self.started)


def _proc_stat(pid: int) -> tuple[str, str]:
  """(state letter, start time) of a process from /proc, or ("", "") where there is no /proc."""
  try:
    text = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return "", ""
  fields = text.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
  return fields[0], fields[19]  # fields 3 and 22 of proc(5)


_UNREADABLE = "unreadable"


def _read_lock(path: pathlib.Path) -> Holder | str | None:
  """The lock's holder; None when there is no lock; _UNREADABLE when it is empty or damaged."""
  try:
    return _parse(path.read_bytes())
  except FileNotFoundError:
    return None
  except OSError:
    return _UNREADABLE


def _parse(content: bytes) -> Holder | str:
  try:
    return Holder(**json.loads(content.decode("utf-8")))
  except (ValueError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    return _UNREADABLE


def _in_use(workdir: pathlib.Path, holder: Holder) -> WorkdirError:
  message = (f"{workdir} is in use by pid {holder.pid} on host {holder.host} (another {holder.command}); "
             "wait for it or use another --workdir")
  if holder.alive() is None:
    message += f" (if that run has ended, delete {workdir / LOCK_NAME})"
  return WorkdirError(message)


class Lock:
  """A held workdir lock; `release` removes the file only while it is still this lock's.

  A workdir the lock created and nothing else filled (a run refused before writing) goes too.
  """

  def __init__(self, path: pathlib.Path, holder: Holder, created_folder: bool = False):
    self.path, self.holder, self.created_folder = path, holder, created_folder

  def release(self) -> None:
    current = _read_lock(self.path)
    if isinstance(current, Holder) and current.token == self.holder.token:
      self.path.unlink(missing_ok=True)
    _MY_TOKENS.discard(self.holder.token)
    if self.created_folder:
      with contextlib.suppress(OSError):  # not empty: the run wrote something, which stays
        self.path.parent.rmdir()


def acquire(workdir: str | pathlib.Path, is_primary: bool = True, command: str = "llm-jax train") -> Lock | None:
  """Takes `workdir`'s lock for this process (creating the folder); None when not `is_primary`.

  The file is created with O_CREAT | O_EXCL, so of two processes starting together exactly one
  gets it. A lock whose process is gone (same host, pid dead, a zombie or a reused pid) is
  stale: it is replaced, with one line on stderr saying so. A live holder, or one on another
  host, is refused with one line.
  """
  if not is_primary:
    return None
  workdir = pathlib.Path(workdir)
  check_writable(workdir)
  created = not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_NAME
  me = Holder(os.getpid(), socket.gethostname(), command, secrets.token_hex(8), _proc_stat(os.getpid())[1])
  for _ in range(10):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      _judge(workdir, path)
      continue
    except OSError as e:
      raise WorkdirError(f"cannot create the lock {path} ({e.strerror}); fix the folder or use another "
                         "--workdir") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(json.dumps(dataclasses.asdict(me)) + "\n")
    _MY_TOKENS.add(me.token)
    return Lock(path, me, created)
  raise WorkdirError(f"cannot take the lock {path}: it keeps changing hands; start one llm-jax process per workdir")


def _judge(workdir: pathlib.Path, path: pathlib.Path) -> None:
  """Raises for a live lock; removes a stale one (saying so) so the caller can try again."""
  try:
    seen = path.read_bytes()
  except FileNotFoundError:
    return  # released meanwhile
  holder = _parse(seen)
  if holder == _UNREADABLE:
    try:
      age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
      return  # released meanwhile
    if age < _WRITE_GRACE_S:
      raise WorkdirError(f"{workdir} is being locked by another process that is starting; wait for it or use "
                         "another --workdir")
    reason = f"{path} is damaged"
  elif holder.alive() is False:
    reason = f"pid {holder.pid} on host {holder.host}, which held it, is no longer running"
  else:
    raise _in_use(workdir, holder)
  if _remove_if_unchanged(path, seen):
    print(f"llm-jax: warning: replacing the stale lock of {workdir} ({reason})", file=sys.stderr, flush=True)


def _remove_if_unchanged(path: pathlib.Path, seen: bytes) -> bool:
  """Removes the lock file only if it still holds `seen`, so a lock taken meanwhile survives."""
  grave = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{secrets.token_hex(4)}")
  try:
    os.rename(path, grave)  # atomic: of two processes removing a stale lock, one moves it
  except FileNotFoundError:
    return False
  if grave.read_bytes() != seen:  # we moved a lock taken since we read it: put it back
    with contextlib.suppress(FileExistsError):
      os.link(grave, path)
    grave.unlink()
    return False
  grave.unlink()
  return True


@contextlib.contextmanager
def lock(workdir: str | pathlib.Path, is_primary: bool = True, command: str = "llm-jax train") -> Iterator[Lock | None]:
  """`with workdir.lock(path, is_primary=jax.process_index() == 0):` holds the lock for the block."""
  held = acquire(workdir, is_primary, command)
  try:
    yield held
  finally:
    if held is not None:
      held.release()
