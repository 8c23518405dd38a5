"""2 processes x 4 CPU devices (jax.distributed over gloo, via launch/local_processes.sh) give
the same per-step losses as 1 process x 8 devices with the same global batch and data."""
import json
import os
import subprocess
import sys

import numpy as np

from tests import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=configs/demo.py", "--config.model.variant=mu/8",
         "--config.model.image_size=32", "--config.input.batch_size=16",
         "--config.total_steps=4", "--config.log_training_steps=1", "--config.mesh.data=2",
         "--config.mesh.fsdp=4", "--config.sharding_rules=((\".*\", \"fsdp\"),)",
         "--config.evals.zeroshot.every_steps=0", "--config.evals.zeroshot.num_examples=16",
         "--config.evals.zeroshot.batch_size=16", "--config.evals.retrieval.num_examples=16",
         "--config.evals.retrieval.batch_size=16"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  return [r["loss"] for r in recs if "loss" in r], [r for r in recs if "zeroshot/colour_top1" in r]


_env = cpu_devices.env


def test_two_processes_match_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  r = subprocess.run([sys.executable, "-m", "superclip_jax.main", f"--workdir={one}", *FLAGS],
                     cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  r = subprocess.run(["bash", "launch/local_processes.sh", "2", f"--workdir={two}", *FLAGS],
                     cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  losses_one, zs_one = _losses(one)
  losses_two, zs_two = _losses(two)
  assert len(losses_one) == len(losses_two) == 4
  np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
  assert zs_one[-1]["zeroshot/num_examples"] == zs_two[-1]["zeroshot/num_examples"] == 16
  np.testing.assert_allclose(zs_two[-1]["zeroshot/colour_top1"], zs_one[-1]["zeroshot/colour_top1"])
  # Only process 0 writes metrics: one record per step, not two.
  assert len([1 for _ in open(os.path.join(two, "metrics.jsonl"))]) == len(
      [1 for _ in open(os.path.join(one, "metrics.jsonl"))])
