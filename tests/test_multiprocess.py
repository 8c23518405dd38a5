"""2 processes x 4 CPU devices (jax.distributed over gloo, via launch/local_processes.sh) give
the same per-step losses as 1 process x 8 devices with the same global batch and data, and
evaluate a checkpoint together to the numbers one process gets."""
import json
import os
import shutil
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


def _env(devices):
  return cpu_devices.env(devices, cached=True)


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

  # The standalone evaluation command, 2 processes on the 2-process run's checkpoint and
  # 1 process (on a copy, so the two do not append to one metrics.jsonl at once).
  alone = str(tmp_path / "alone")
  trained_lines = len(open(os.path.join(two, "metrics.jsonl")).readlines())
  shutil.copytree(two, alone)
  evals = ["--evals=zeroshot,retrieval"]
  procs = [subprocess.Popen(["bash", "launch/local_processes.sh", "2", f"--workdir={two}", *evals],
                            cwd=REPO, env=dict(_env(4), MODULE="superclip_jax.evaluate"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
           subprocess.Popen([sys.executable, "-m", "superclip_jax.evaluate", f"--workdir={alone}",
                             *evals], cwd=REPO, env=_env(8), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  final = {}
  for workdir in (two, alone):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f][trained_lines:]  # the evaluation's records
    assert len(records) == 2, records  # one per evaluator, from process 0 only
    final[workdir] = {**records[0], **records[1]}
  metrics = [k for k in final[alone] if k.split("/")[0] in ("zeroshot", "retrieval")
             and not k.endswith("seconds")]
  assert "zeroshot/colour_top1" in metrics and "retrieval/image_to_text_R@1" in metrics, metrics
  for k in metrics:
    np.testing.assert_allclose(final[two][k], final[alone][k], atol=1e-6, err_msg=k)
  # And they are what the training run's own final evaluation measured on the same weights.
  np.testing.assert_allclose(final[two]["zeroshot/colour_top1"], zs_two[-1]["zeroshot/colour_top1"])
