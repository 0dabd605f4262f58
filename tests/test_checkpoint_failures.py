"""Checkpoints under failure: a kill in the middle of a save, and a disk that fills up."""

import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from llm_jax import checkpoint
from llm_jax import config as config_lib

# Saves a small step-1 checkpoint, then a step-2 checkpoint large enough (64 MB of random
# floats, which do not compress) that a kill can land while it is being written.
SAVER = textwrap.dedent("""
    import resource, signal, sys
    import jax, jax.numpy as jnp
    from llm_jax import checkpoint, config as config_lib
    ckpt = checkpoint.Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.arange(4.0)}, {"step": jnp.int32(1)}, {"position": 1}, config_lib.Config())
    ckpt.wait()
    print("saved 1", flush=True)
    if sys.argv[2] == "full-disk":  # every file this process writes may hold at most 64 KiB
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    big = jax.random.normal(jax.random.key(0), (4096, 4096))
    ckpt.save(2, {"w": big}, {"step": jnp.int32(2)}, {"position": 2}, config_lib.Config())
    ckpt.wait()
    print("saved 2", flush=True)
""")


def start_saver(workdir, mode):
  return subprocess.Popen([sys.executable, "-c", SAVER, str(workdir), mode], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def restore_step_1(workdir):
  ckpt = checkpoint.Checkpointer(workdir)
  restored = ckpt._manager.restore(1, args=checkpoint.ocp.args.Composite(
      params=checkpoint.ocp.args.StandardRestore({"w": jax.ShapeDtypeStruct((4,), np.float32)}),
      data=checkpoint.ocp.args.JsonRestore()))
  latest = ckpt.restorable_step()
  ckpt.close()
  return latest, restored


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, capfd):
  process = start_saver(tmp_path, "kill")
  directory = tmp_path / "checkpoints"
  deadline = time.time() + 120
  while time.time() < deadline and process.poll() is None:
    if (directory / "1").is_dir() and any(".orbax-checkpoint-tmp" in p.name for p in directory.iterdir()):
      break
    time.sleep(0.001)
  process.send_signal(signal.SIGKILL)
  process.wait()
  names = sorted(p.name for p in directory.iterdir())
  assert names == ["1", "2.orbax-checkpoint-tmp"], names  # killed mid-save
  latest, restored = restore_step_1(tmp_path)
  assert latest == 1
  np.testing.assert_array_equal(restored.params["w"], np.arange(4.0))
  assert restored.data == {"position": 1}
  assert "removed 2.orbax-checkpoint-tmp, a checkpoint save that was interrupted" in capfd.readouterr().out
  assert sorted(p.name for p in directory.iterdir()) == ["1"]  # later runs do not trip over it again


def test_full_disk_fails_loudly_and_keeps_previous_checkpoint(tmp_path):
  process = start_saver(tmp_path, "full-disk")
  out, err = process.communicate(timeout=180)
  assert "saved 1" in out and "saved 2" not in out
  assert process.returncode != 0
  last_line = err.strip().splitlines()[-1]
  assert "CheckpointError: saving a checkpoint in" in last_line and "File too large" in last_line
  assert "earlier checkpoints there are intact" in last_line and "free disk space" in last_line
  latest, restored = restore_step_1(tmp_path)
  assert latest == 1
  np.testing.assert_array_equal(restored.params["w"], np.arange(4.0))


def test_a_failed_save_that_is_not_a_full_disk_names_its_own_cause(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(1, {"w": np.arange(4.0)}, {"step": np.int32(1)}, {"position": 1}, config_lib.Config())
  ckpt.wait()
  with pytest.raises(checkpoint.CheckpointError) as failure:
    ckpt.save(1, {"w": np.arange(4.0)}, {"step": np.int32(1)}, {"position": 1}, config_lib.Config())
    ckpt.wait()
  ckpt.close()
  assert "Checkpoint for step 1 already exists" in str(failure.value)
  assert "disk space" not in str(failure.value) and "fix the cause" in str(failure.value)
