"""A run killed with SIGKILL at random moments and restarted each time ends exactly where an
uninterrupted run ends: the same parameters (bitwise, CPU) and the same metrics."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from superclip_jax import checkpoint
from tests import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.model.variant=mu/8", "--config.model.image_size=32",
         "--config.input.batch_size=8", "--config.log_training_steps=1", "--config.ckpt_steps=2",
         "--config.total_steps=10", "--config.evals.zeroshot.num_examples=16",
         "--config.evals.zeroshot.batch_size=8", "--config.evals.zeroshot.every_steps=4"]


ENV = cpu_devices.compile_cache(os.environ)


def _cmd(workdir):
  return [sys.executable, "-m", "superclip_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", *FLAGS]


# Timings, and what each (re)start measures once: they differ between runs by nature.
MEASURED = ("step_time", "img_per_sec", "eta_sec", "img_per_sec_per_device", "tflops_per_device",
            "mfu", "data_wait_fraction", "flops_per_step", "peak_tflops_per_device",
            "peak_memory_bytes")


def _last_record_per_step(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      key = (rec["step"], "loss" in rec)
      out[key] = {k: v for k, v in rec.items() if k not in MEASURED and not k.endswith("seconds")}
  return out


def test_sigkill_at_random_moments_then_restart_is_exact(tmp_path):
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  r = subprocess.run(_cmd(ref), cwd=REPO, capture_output=True, text=True, timeout=600,
                     env=ENV)
  assert r.returncode == 0, r.stderr[-3000:]

  rng = random.Random(0)
  kills = 0
  for _ in range(4):
    proc = subprocess.Popen(_cmd(killed), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)
    # Let it reach training (compile done), then kill somewhere in the next second or so:
    # mid-step, mid-checkpoint write or mid-evaluation.
    for line in proc.stdout:
      if line.startswith("step "):
        break
    time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait()
    if proc.returncode == 0:
      break
  else:
    r = subprocess.run(_cmd(killed), cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
  assert kills >= 1

  cfg_a, params_a, idf_a, _ = checkpoint.load_params(ref)
  cfg_b, params_b, idf_b, _ = checkpoint.load_params(killed)
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  np.testing.assert_array_equal(idf_a["doc_freq"], idf_b["doc_freq"])
  assert _last_record_per_step(ref) == _last_record_per_step(killed)
  # Only complete checkpoints are ever listed.
  steps = checkpoint.Checkpointer(killed, cfg_b).all_steps()
  assert max(steps) == 10 and all(s % 2 == 0 for s in steps)
