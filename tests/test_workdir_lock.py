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


RACER = """
import os, sys, time
from superclip_jax import workdir_lock
workdir, start, tried, racers = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
while time.time() < start:  # all racers leave the line at the same instant
  pass
try:
  with workdir_lock.hold(workdir):
    open(os.path.join(tried, str(os.getpid())), "w").close()
    print("held", flush=True)
    deadline = time.time() + 90  # released only once every racer has tried
    while len(os.listdir(tried)) < racers and time.time() < deadline:
      time.sleep(0.05)
except workdir_lock.WorkdirLockedError:
  open(os.path.join(tried, str(os.getpid())), "w").close()
  print("refused", flush=True)
"""


def test_racing_starts_let_exactly_one_in(tmp_path):
  """5 processes take the same fresh workdir's lease in the same instant: one holds it, 4 are
  refused (creation is O_EXCL, not a check and then a write)."""
  n = 5
  workdir, tried = str(tmp_path / "run"), str(tmp_path / "tried")
  os.makedirs(workdir)
  os.makedirs(tried)
  start = time.time() + 8  # after every interpreter has imported jax (late ones still race)
  racers = [subprocess.Popen([sys.executable, "-c", RACER, workdir, str(start), tried, str(n)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"}) for _ in range(n)]
  outcomes = []
  for p in racers:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    outcomes.append(out.strip())
  assert sorted(outcomes) == ["held"] + ["refused"] * (n - 1), outcomes
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released


def test_two_trainers_started_together_one_runs_the_other_refuses(tmp_path):
  """The reported race: two trainers with different configs on one workdir used to run
  together (checkpoints replacing each other's, metrics.jsonl interleaved, both exit 0)."""
  workdir = str(tmp_path / "run")
  env = cpu_devices.compile_cache(os.environ)
  trainers = [subprocess.Popen(
      [sys.executable, "-m", "superclip_jax.main", "--config=configs/demo.py",
       f"--workdir={workdir}", *TINY, "--config.total_steps=4", "--config.ckpt_steps=4",
       f"--config.lr={lr}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=env) for lr in (1e-3, 2e-3)]
  results = [(p.returncode, err) for p in trainers
             for _, err in [p.communicate(timeout=600)]]
  codes = sorted(code for code, _ in results)
  assert codes[0] == 0 and codes[1] != 0, [(c, e[-1500:]) for c, e in results]
  loser = next(err for code, err in results if code != 0)
  assert "train.lock" in loser or "held by" in loser, loser[-1500:]
  with open(os.path.join(workdir, "config.json")) as f:
    winner_lr = json.load(f)["lr"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == sorted(set(steps)), steps  # one run's records, not two interleaved
  assert winner_lr in (1e-3, 2e-3)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]


def test_a_lease_being_written_is_not_taken_over(tmp_path):
  """The racing starts' failure (two held): a starter found the lease another had just created
  but not yet written, read it as an empty, stale lease and took it over. A young empty lease
  is now left alone; an old one (a writer that crashed) is still taken over."""
  lock = tmp_path / workdir_lock.LOCK_FILE
  lock.write_text("")  # what O_EXCL creation leaves until the write
  with pytest.raises(workdir_lock.WorkdirLockedError, match="still being written"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  assert lock.read_text() == ""
  old = time.time() - 2 * workdir_lock.WRITE_GRACE
  os.utime(lock, (old, old))
  with workdir_lock.hold(str(tmp_path)):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert not lock.exists()


def test_the_lease_appears_whole(tmp_path, monkeypatch):
  """Locally the lease is linked into place already written; without hard links, O_EXCL."""
  path = str(tmp_path / workdir_lock.LOCK_FILE)
  seen = []
  real_link = os.link

  def link(src, dst):
    seen.append(open(src).read())  # the text is complete before the lease can exist
    return real_link(src, dst)

  monkeypatch.setattr(os, "link", link)
  assert workdir_lock._create(path, '{"token": "a"}')
  assert not workdir_lock._create(path, '{"token": "b"}')
  assert seen == ['{"token": "a"}', '{"token": "b"}']
  assert open(path).read() == '{"token": "a"}'
  os.remove(path)

  def no_link(src, dst):
    raise PermissionError("hard links not supported")

  monkeypatch.setattr(os, "link", no_link)
  assert workdir_lock._create(path, '{"token": "c"}')
  assert not workdir_lock._create(path, '{"token": "d"}')
  assert open(path).read() == '{"token": "c"}'
  assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_FILE]  # no temporary left
