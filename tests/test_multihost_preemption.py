"""Preemption on 2 processes (issue 15.2): a notice to one process stops both after the same
step, with one checkpoint, and the restart continues the uninterrupted run bitwise; a peer
killed outright makes the survivor leave within a bounded time, saying why."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
FLAGS = ["--config=configs/demo.py", "--config.model.variant=mu/8",
         "--config.model.image_size=32", "--config.input.batch_size=8",
         f"--config.total_steps={STEPS}", "--config.log_training_steps=1",
         "--config.ckpt_steps=100", "--config.evals={}", "--heartbeat_timeout_seconds=10"]


def _port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, port):
  return [subprocess.Popen(
      [sys.executable, "-m", "superclip_jax.main", f"--workdir={workdir}", *FLAGS,
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=cpu_devices.env(1, cached=True), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs, timeout=300):
  errs = []
  for p in procs:
    try:
      errs.append(p.communicate(timeout=timeout)[1])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("a process hung")
  return [p.returncode for p in procs], errs


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _wait_for_step(workdir, step, procs, timeout=300):
  deadline = time.monotonic() + timeout
  while step not in _records(workdir):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no progress"
    time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mp") / "whole")
  codes, errs = _finish(_start(workdir, _port()))
  assert codes == [0, 0], errs[0][-3000:]
  assert sorted(_records(workdir)) == list(range(1, STEPS + 1))
  return _records(workdir)


def _checkpoints(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_bitwise(
    tmp_path, uninterrupted):
  workdir = str(tmp_path / "run")
  procs = _start(workdir, _port())
  _wait_for_step(workdir, 2, procs)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only; process 0 hears nothing
  start = time.monotonic()
  codes, errs = _finish(procs, timeout=120)
  assert codes == [0, 0], errs
  assert time.monotonic() - start < 60
  stopped = max(_records(workdir))
  assert stopped < STEPS, "the notice came too late to test anything"
  assert f"Stopping after step {stopped}: a preemption notice reached process(es) 1" in errs[0]
  assert _checkpoints(workdir) == [stopped]  # both saved that step: one complete checkpoint
  codes, errs = _finish(_start(workdir, _port()))
  assert codes == [0, 0], errs[0][-3000:]
  assert _records(workdir) == uninterrupted  # every step's loss, bitwise


def test_a_killed_peer_makes_the_survivor_leave_with_a_message_then_a_restart_resumes(
    tmp_path, uninterrupted):
  workdir = str(tmp_path / "run")
  procs = _start(workdir, _port())
  _wait_for_step(workdir, 2, procs)
  procs[0].send_signal(signal.SIGTERM)  # a checkpoint to resume from ...
  procs[0].wait(timeout=120)
  assert procs[0].returncode == 0
  procs[1].wait(timeout=120)
  saved = _checkpoints(workdir)[-1]
  procs = _start(workdir, _port())  # ... then a run whose process 1 is killed
  _wait_for_step(workdir, saved + 1, procs)
  procs[1].kill()
  start = time.monotonic()
  codes, errs = _finish(procs[:1], timeout=180)
  procs[1].wait()
  assert codes[0] != 0 and time.monotonic() - start < 120
  assert any(s in errs[0] for s in ("heartbeat", "distributed service", "did not reach")), (
      errs[0][-3000:])
  codes, errs = _finish(_start(workdir, _port()))
  assert codes == [0, 0], errs[0][-3000:]
  records = _records(workdir)
  assert {s: records[s] for s in range(saved + 1, STEPS + 1)} == {
      s: uninterrupted[s] for s in range(saved + 1, STEPS + 1)}
