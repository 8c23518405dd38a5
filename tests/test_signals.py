"""Signals during the final save (issue 16.5): a second SIGTERM does not cut the save short,
a first Ctrl-C stops like a preemption (with a checkpoint), a second Ctrl-C aborts."""
import os
import subprocess
import sys

from tests import cpu_devices

# Trains a tiny model; `mode` says which signals reach it, and when:
#   term-twice: SIGTERM after step 2, then SIGTERM again while the final save is being written
#               (the trainer used to put the default handler back first: that one killed it);
#   int-once:   SIGINT after step 2;
#   int-twice:  SIGINT after step 2, then SIGINT again while the final save is being written.
SCRIPT = r"""
import os, signal, sys
from superclip_jax import checkpoint, train
from tests.test_train import tiny_config

mode, workdir = sys.argv[1], sys.argv[2]
first = signal.SIGINT if mode.startswith("int") else signal.SIGTERM
close = checkpoint.Checkpointer.close

def signal_then_close(self):  # the final save is still being written when the loop closes
  if mode.endswith("twice"):
    os.kill(os.getpid(), first)
  close(self)

checkpoint.Checkpointer.close = signal_then_close
config = tiny_config(total_steps=50, ckpt_steps=100, log_training_steps=1)
import superclip_jax.metrics_log as metrics_log
progress = metrics_log.MetricLogger.progress

def progress_then_signal(self, step, metrics):
  out = progress(self, step, metrics)
  if step == 2:
    os.kill(os.getpid(), first)
  return out

metrics_log.MetricLogger.progress = progress_then_signal
state = train.train_and_evaluate(config, workdir)
print("RETURNED", int(state.step))
"""


def _run(tmp_path, mode):
  workdir = str(tmp_path / mode)
  r = subprocess.run([sys.executable, "-c", SCRIPT, mode, workdir], cwd=cpu_devices.REPO,
                     env=cpu_devices.env(1, cached=True), capture_output=True, text=True,
                     timeout=300)
  steps = os.path.join(workdir, "checkpoints")
  return r, sorted(os.listdir(steps)) if os.path.exists(steps) else []


def test_a_second_sigterm_during_the_final_save_waits_for_it(tmp_path):
  r, saved = _run(tmp_path, "term-twice")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "RETURNED 2" in r.stdout
  assert saved == ["2"]  # complete: no N.orbax-checkpoint-tmp left behind


def test_ctrl_c_once_saves_and_stops_twice_aborts(tmp_path):
  r, saved = _run(tmp_path, "int-once")
  assert r.returncode == 0 and "RETURNED 2" in r.stdout, r.stderr[-3000:]
  assert "Ctrl-C again aborts" in r.stderr and saved == ["2"]
  r, saved = _run(tmp_path, "int-twice")
  assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr
  assert "RETURNED" not in r.stdout
