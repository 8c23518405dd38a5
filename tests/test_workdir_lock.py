"""One trainer per workdir (issue 16.1): a second one refuses, naming the holder; a stale lease
(its process gone, or not refreshed for too long) is taken over."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from superclip_jax import train, workdir_lock
from tests import cpu_devices
from tests.test_main import REPO, TINY
from tests.test_train import tiny_config


def test_a_second_trainer_refuses_then_takes_over_when_the_first_is_killed(tmp_path):
  workdir = str(tmp_path / "run")
  lock = tmp_path / "run" / workdir_lock.LOCK_FILE
  first = subprocess.Popen(
      [sys.executable, "-m", "superclip_jax.main", "--config=configs/demo.py",
       f"--workdir={workdir}", *TINY, "--config.total_steps=100000"],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env=cpu_devices.compile_cache(os.environ))
  try:
    deadline = time.time() + 300
    while not lock.exists() and first.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    assert lock.exists(), "the first trainer took no lock"
    config = tiny_config(total_steps=2, ckpt_steps=2)
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=f"host '{socket.gethostname()}', pid {first.pid}"):
      train.train_and_evaluate(config, workdir)
    assert not (tmp_path / "run" / "checkpoints" / "2").exists()
  finally:
    first.kill()
    first.wait()  # reaped: its pid is gone
  state = train.train_and_evaluate(config, workdir)  # the dead trainer's lease is stale
  assert int(state.step) == 2 and not lock.exists()  # released at the end


def test_a_lease_from_another_host_is_refused_while_fresh_and_taken_once_stale(tmp_path):
  lock = tmp_path / workdir_lock.LOCK_FILE
  holder = {"host": "elsewhere", "pid": 1, "start": time.time() - 100,
            "refreshed": time.time() - 100, "token": "t"}
  lock.write_text(json.dumps(holder))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="host 'elsewhere', pid 1"):
    with workdir_lock.hold(str(tmp_path), stale=1000):
      pass
  with workdir_lock.hold(str(tmp_path), stale=50, refresh=0.05):
    time.sleep(0.2)  # refreshed by the daemon thread meanwhile
    now = json.loads(lock.read_text())
    assert now["pid"] == os.getpid() and now["refreshed"] > now["start"]
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      with workdir_lock.hold(str(tmp_path)):  # this process already holds it
        pass
  assert not lock.exists()
