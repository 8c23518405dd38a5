"""SLURM start-up for real, without SLURM: 2 local processes get the environment srun gives its
tasks and no --coordinator_address; jax.distributed's own SlurmCluster must find process 0
(first host of SLURM_STEP_NODELIST, port 61440 + SLURM_JOB_ID % 4096), and the run must be one
2-process job whose losses equal a 1-process run's. What this cannot fake: srun itself (task
launch, CPU/GPU binding), other hosts in the node list, and slurmd's signals. Also: which
environments distributed.py takes for a cluster at all."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from superclip_jax import distributed
from tests import cpu_devices
from tests.test_multiprocess import FLAGS

REPO = cpu_devices.REPO
RUN = [f for f in FLAGS if not f.startswith("--config.total_steps=")] + ["--config.total_steps=3"]


def _slurm_env(job_id: int, ntasks: int, procid: int) -> dict:
  """What srun sets for task `procid` of a one-node step (the variables JAX reads, and the
  neighbours a real step has beside them)."""
  return {"SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0",
          "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
          "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid), "SLURM_NODEID": "0",
          "SLURM_STEP_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
          "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1",
          "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": str(ntasks),
          "SLURM_TASKS_PER_NODE": str(ntasks), "SLURM_NTASKS_PER_NODE": str(ntasks)}


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_slurm_tasks_match_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  r = subprocess.run([sys.executable, "-m", "superclip_jax.main", f"--workdir={one}", *RUN],
                     cwd=REPO, env=cpu_devices.env(8, cached=True), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]

  job_id = random.randrange(10_000, 1_000_000)  # the coordinator port follows the job id
  base = {k: v for k, v in cpu_devices.env(4, cached=True).items()
          if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
  procs = [subprocess.Popen([sys.executable, "-m", "superclip_jax.main", f"--workdir={two}", *RUN],
                            cwd=REPO, env={**base, **_slurm_env(job_id, 2, i)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    errors = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-3000:]

  # One job of 2 processes x 4 devices, not two independent 4-device runs.
  with open(os.path.join(two, "versions.json")) as f:
    info = json.load(f)
  assert (info["process_count"], info["device_count"], info["local_device_count"]) == (2, 8, 4)
  losses_one = [r["loss"] for r in _records(one) if "loss" in r]
  losses_two = [r["loss"] for r in _records(two) if "loss" in r]
  assert len(losses_one) == len(losses_two) == 3  # process 0 alone writes the records
  np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)


def test_partial_slurm_environment_is_a_clear_error(monkeypatch):
  # A python started by the batch script itself (no srun): SLURM_NTASKS says 2, but no step.
  for k in list(os.environ):
    if k.startswith("SLURM_"):
      monkeypatch.delenv(k)
  monkeypatch.setenv("SLURM_JOB_ID", "123")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  with pytest.raises(ValueError, match="SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID unset"
                                       ": start every process with srun"):
    distributed.initialize()
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job is a single process: nothing to do
  assert distributed._auto_cluster() is None
  for k, v in _slurm_env(123, 2, 0).items():
    monkeypatch.setenv(k, v)
  assert distributed._auto_cluster() == "SLURM"


def test_cloud_tpu_vm_is_detected(monkeypatch):
  from jax._src import cloud_tpu_init
  for k in list(os.environ):
    if k.startswith(("SLURM_", "TPU_WORKER_HOSTNAMES")):
      monkeypatch.delenv(k)
  assert distributed._auto_cluster() is None  # this CPU machine
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)  # what import jax sets
  assert distributed._auto_cluster() == "Cloud TPU"  # (a TPU VM: hosts from its metadata)
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")  # GKE
  assert distributed._auto_cluster() == "Cloud TPU"
