"""Workdirs: what holds a run, --fresh clearing, writability, and the lock, with real processes."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

from llm_jax import workdir
from llm_jax.workdir import WorkdirError

# A process that takes the lock of argv[1], says so, and holds it until its stdin gets a line.
HOLDER = """
import sys
from llm_jax import workdir
try:
  with workdir.lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
except workdir.WorkdirError as e:
  print("refused", e, flush=True)
"""


def start_holder(path: pathlib.Path) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def held_by(path: pathlib.Path) -> dict:
  return json.loads((path / workdir.LOCK_NAME).read_text())


def snapshot(folder: pathlib.Path) -> dict[str, bytes | None]:
  """Every path under `folder` with its bytes (None for folders), to show that nothing changed."""
  return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def make_run(path: pathlib.Path, *, export: bool = False) -> pathlib.Path:
  """A folder with every name a run (and an export into it) writes, plus a file of the user's."""
  (path / "checkpoints" / "10").mkdir(parents=True)
  (path / "checkpoints" / "10" / "commit_success.txt").write_text("ok")
  (path / "tensorboard").mkdir()
  (path / "tensorboard" / "events.out").write_bytes(b"\x01\x02")
  for name in ("config.json", "metrics.jsonl", "tokenizer.json", "tokenizer.model", "curves.png"):
    (path / name).write_text(name)
  if export:
    for name in ("params", "eval", "profile", "damaged_checkpoints"):
      (path / name).mkdir()
      (path / name / "data").write_text(name)
    for name in ("hf_config.json", "checksums.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
      (path / name).write_text("{}")
  (path / "notes.txt").write_text("mine")
  return path


def test_holds_run(tmp_path):
  run = make_run(tmp_path / "run")
  assert workdir.holds_run(run)
  logged = tmp_path / "logged"  # config and metrics, before its first checkpoint
  logged.mkdir()
  (logged / "config.json").write_text("{}")
  (logged / "metrics.jsonl").write_text("")
  assert workdir.holds_run(logged)
  export = tmp_path / "export"  # what `llm-jax export` writes is not a run
  (export / "params").mkdir(parents=True)
  (export / "config.json").write_text("{}")
  assert not workdir.holds_run(export)
  assert not workdir.holds_run(tmp_path / "missing")
  assert not workdir.holds_run(run / "config.json")  # a file


def test_refuse_run_folder(tmp_path):
  run = make_run(tmp_path / "run")
  before = snapshot(tmp_path)
  for out, message in [
      (run, rf"--out {run} holds a training run \(checkpoints, config.json\); export would overwrite"),
      (run / "config.json", rf"--out {run / 'config.json'} is a file; export writes a folder"),
      (run / "checkpoints", rf"--out {run / 'checkpoints'} lies inside checkpoints of the training run in {run}; "),
      (run / "checkpoints" / "10" / "x", rf"lies inside checkpoints of the training run in {run}; export would mix"),
  ]:
    with pytest.raises(WorkdirError, match=message):
      workdir.refuse_run_folder(out, "export")
  workdir.refuse_run_folder(run / "exports" / "x", "export")  # a folder of the user's inside the run's folder
  workdir.refuse_run_folder(tmp_path / "new", "export")
  assert snapshot(tmp_path) == before


def test_clear_run_removes_what_runs_and_exports_wrote_and_nothing_else(tmp_path):
  run = make_run(tmp_path / "run", export=True)
  removed = workdir.clear_run(run)
  assert sorted(removed) == sorted(workdir.RUN_FILES)
  assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
  assert workdir.clear_run(run) == []
  assert workdir.clear_run(tmp_path / "missing") == []


def test_clear_run_inside_the_lock_keeps_the_lock(tmp_path):
  run = make_run(tmp_path / "run")
  with workdir.lock(run) as held:
    workdir.clear_run(run)
    assert sorted(p.name for p in run.iterdir()) == [workdir.LOCK_NAME, "notes.txt"]
    assert held_by(run)["token"] == held.holder.token
  assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_clear_run_refuses_a_folder_another_process_holds(tmp_path):
  run = make_run(tmp_path / "run")
  holder = start_holder(run)
  try:
    assert holder.stdout.readline() == "locked\n"
    before = snapshot(run)
    with pytest.raises(WorkdirError, match=rf"is in use by pid {holder.pid} on host "):
      workdir.clear_run(run)
    assert snapshot(run) == before
  finally:
    holder.communicate("\n", timeout=60)


def test_clear_run_removes_a_stale_lock(tmp_path):
  run = make_run(tmp_path / "run")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  lock = {"pid": int(dead.stdout), "host": socket.gethostname(), "command": "llm-jax train", "token": "t"}
  (run / workdir.LOCK_NAME).write_text(json.dumps(lock))
  workdir.clear_run(run)
  assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
  run = tmp_path / "run"
  first = start_holder(run)
  try:
    assert first.stdout.readline() == "locked\n"
    assert held_by(run)["pid"] == first.pid and held_by(run)["host"] == socket.gethostname()
    second = start_holder(run)
    out, err = second.communicate("\n", timeout=60)
    assert out.splitlines() == [f"refused {run} is in use by pid {first.pid} on host {socket.gethostname()} "
                                "(another llm-jax train); wait for it or use another --workdir"]
    assert held_by(run)["pid"] == first.pid  # the refused process left the lock alone
  finally:
    first.communicate("\n", timeout=60)
  assert first.returncode == 0
  assert not (run / workdir.LOCK_NAME).exists()  # released on exit


def test_processes_starting_together_get_the_lock_once(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  holders = [start_holder(run) for _ in range(4)]
  answers = [h.stdout.readline().split()[0] for h in holders]  # each either holds it or was refused
  for h in holders:
    h.communicate("\n", timeout=60)
  assert sorted(answers) == ["locked", "refused", "refused", "refused"]


def test_lock_is_released_after_an_error_and_can_be_taken_again(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir.lock(tmp_path):
      assert held_by(tmp_path)["pid"] == os.getpid()
      raise RuntimeError("the run failed")
  assert not (tmp_path / workdir.LOCK_NAME).exists()
  with workdir.lock(tmp_path) as held:
    assert held_by(tmp_path)["token"] == held.holder.token


def test_a_folder_the_lock_created_goes_with_it_when_left_empty(tmp_path):
  with workdir.lock(tmp_path / "refused"):
    pass  # a run that stopped before writing anything
  assert not (tmp_path / "refused").exists()
  with workdir.lock(tmp_path / "ran"):
    (tmp_path / "ran" / "config.json").write_text("{}")
  assert [p.name for p in (tmp_path / "ran").iterdir()] == ["config.json"]
  (tmp_path / "empty").mkdir()
  with workdir.lock(tmp_path / "empty"):
    pass
  assert (tmp_path / "empty").is_dir()  # the user's own folder stays


def test_killed_holder_leaves_a_stale_lock_that_is_replaced(tmp_path, capfd):
  holder = start_holder(tmp_path)
  assert holder.stdout.readline() == "locked\n"
  holder.kill()
  holder.communicate(timeout=60)
  assert held_by(tmp_path)["pid"] == holder.pid  # a crash cannot release it
  with workdir.lock(tmp_path):
    assert held_by(tmp_path)["pid"] == os.getpid()
  err = capfd.readouterr().err.strip().splitlines()
  assert err == [f"llm-jax: warning: replacing the stale lock of {tmp_path} (pid {holder.pid} on host "
                 f"{socket.gethostname()}, which held it, is no longer running)"]


def test_killed_holder_not_yet_reaped_is_stale(tmp_path):
  holder = start_holder(tmp_path)
  assert holder.stdout.readline() == "locked\n"
  holder.send_signal(signal.SIGKILL)  # not waited for: a zombie, which os.kill still finds
  deadline = time.time() + 30
  while pathlib.Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
    assert time.time() < deadline
    time.sleep(0.01)
  with workdir.lock(tmp_path):
    assert held_by(tmp_path)["pid"] == os.getpid()
  holder.communicate(timeout=60)


def write_lock(folder: pathlib.Path, **fields) -> None:
  lock = {"pid": os.getpid(), "host": socket.gethostname(), "command": "llm-jax train", "token": "old", **fields}
  folder.mkdir(parents=True, exist_ok=True)
  (folder / workdir.LOCK_NAME).write_text(json.dumps(lock))


def test_lock_from_another_host_is_refused_naming_the_file(tmp_path):
  write_lock(tmp_path, host="node-7", pid=1)
  with pytest.raises(WorkdirError) as error:
    workdir.acquire(tmp_path)
  assert str(error.value) == (f"{tmp_path} is in use by pid 1 on host node-7 (another llm-jax train); wait for it or "
                              f"use another --workdir (if that run has ended, delete {tmp_path / '.lock'})")


def test_reused_pid_is_stale(tmp_path):
  write_lock(tmp_path / "a")  # our pid, not our lock: a process before us had this pid
  with workdir.lock(tmp_path / "a") as held:
    assert held_by(tmp_path / "a")["token"] == held.holder.token
  live = start_holder(tmp_path / "b")  # a live pid whose start time differs from the recorded one
  try:
    assert live.stdout.readline() == "locked\n"
    write_lock(tmp_path / "c", pid=live.pid, started="1")
    with workdir.lock(tmp_path / "c"):
      assert held_by(tmp_path / "c")["pid"] == os.getpid()
    write_lock(tmp_path / "d", pid=live.pid, started=held_by(tmp_path / "b")["started"])
    with pytest.raises(WorkdirError, match=f"in use by pid {live.pid}"):
      workdir.acquire(tmp_path / "d")
  finally:
    live.communicate("\n", timeout=60)


def test_empty_lock_is_refused_while_young_and_replaced_when_old(tmp_path):
  lock = tmp_path / workdir.LOCK_NAME
  lock.write_text("")  # what a process between creating and writing its lock leaves
  with pytest.raises(WorkdirError, match="is being locked by another process that is starting"):
    workdir.acquire(tmp_path)
  old = time.time() - 60
  os.utime(lock, (old, old))  # still empty a minute later: its writer crashed
  with workdir.lock(tmp_path):
    assert held_by(tmp_path)["pid"] == os.getpid()


def test_only_the_primary_process_takes_the_lock(tmp_path):
  write_lock(tmp_path, host="node-7")
  before = snapshot(tmp_path)
  with workdir.lock(tmp_path, is_primary=False) as held:  # process 0 checks; the others trust it
    assert held is None
  assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Writability. Root writes through permission bits, so when the tests run as root the read-only
# cases check from a forked child that has become `nobody`: the folder is then truly read-only
# to the process that checks (the venv's python lies under /root, which nobody cannot execute).


def unprivileged(fn, *args) -> tuple[int, str]:
  """(exit status, stderr) of fn(*args) run in a forked child as a user that permission bits bind."""
  read, write = os.pipe()
  with warnings.catch_warnings():  # JAX warns of deadlocks in forked children; this one runs only the stdlib
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    pid = os.fork()
  if pid == 0:  # the child: report through the pipe, never return into pytest
    code = 1
    try:
      sys.stderr = os.fdopen(write, "w")
      if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
      code = fn(*args) or 0
    except BaseException as e:  # noqa: BLE001 (everything goes back to the parent as one line)
      print(f"{type(e).__name__}: {e}", file=sys.stderr)
    finally:
      sys.stderr.flush()
      os._exit(code)
  os.close(write)
  with os.fdopen(read) as f:
    err = f.read()
  return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


@pytest.fixture
def open_tmp():
  """A folder under /tmp that another user may enter (pytest's tmp_path is private to its user)."""
  path = pathlib.Path(tempfile.mkdtemp(prefix="llm-jax-test-"))
  path.chmod(0o755)
  yield path
  for p in [path, *path.rglob("*")]:
    if p.is_dir():
      p.chmod(0o755)
  shutil.rmtree(path)


def test_check_writable_accepts_new_and_existing_folders_and_leaves_nothing(tmp_path):
  workdir.check_writable(tmp_path)
  workdir.check_writable(tmp_path / "new" / "run")
  assert list(tmp_path.iterdir()) == []


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / "run").write_text("not a folder")
  with pytest.raises(WorkdirError) as error:
    workdir.check_writable(tmp_path / "run")
  assert str(error.value) == f"--workdir {tmp_path / 'run'} is a file, not a folder; pass a folder path (new or " \
                             "empty) or move the file"
  with pytest.raises(WorkdirError) as error:
    workdir.check_writable(tmp_path / "run" / "x" / "y")
  assert str(error.value) == f"--workdir {tmp_path / 'run' / 'x' / 'y'} cannot be created: {tmp_path / 'run'} is " \
                             "a file; pass a path under a folder"
  with pytest.raises(WorkdirError, match="is a file, not a folder"):
    workdir.acquire(tmp_path / "run")  # the lock checks before it writes
  assert (tmp_path / "run").read_text() == "not a folder"


def test_read_only_run_folder(open_tmp):
  run = make_run(open_tmp / "run")
  run.chmod(0o555)
  before = snapshot(run)
  status, err = unprivileged(workdir.check_writable, run)
  assert (status, err) == (1, f"WorkdirError: --workdir {run} is not writable (Permission denied); fix its "
                              "permissions or pass another --workdir\n")
  status, err = unprivileged(workdir.acquire, run)  # the lock refuses it the same way
  assert (status, err.split(": ", 1)[1]) == (1, f"--workdir {run} is not writable (Permission denied); fix its "
                                                "permissions or pass another --workdir\n")
  assert snapshot(run) == before


def test_workdir_under_a_read_only_parent(open_tmp):
  parent = open_tmp / "runs"
  parent.mkdir(mode=0o555)
  status, err = unprivileged(workdir.acquire, parent / "new" / "run")
  assert (status, err) == (1, f"WorkdirError: --workdir {parent / 'new' / 'run'} cannot be created: its parent "
                              f"{parent} is not writable (Permission denied); fix its permissions or pass another "
                              "--workdir\n")
  assert list(parent.iterdir()) == []


def test_check_writable_as_root_is_not_fooled_by_os_access(tmp_path):
  """os.access says root may write anywhere; a real write attempt is what the check trusts."""
  if os.geteuid() != 0 or not pathlib.Path("/sys").is_dir():
    pytest.skip("needs root and /sys, where even root cannot create a folder")
  assert os.access("/sys", os.W_OK)
  with pytest.raises(WorkdirError, match=r"--workdir /sys/llm-jax-run cannot be created: its parent /sys is not "
                                         r"writable \((Permission denied|Operation not permitted)\); fix its"):
    workdir.check_writable("/sys/llm-jax-run")
