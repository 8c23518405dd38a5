"""Starting JAX's multi-process runtime: explicit flags, or automatic on Cloud TPU and SLURM."""
from __future__ import annotations

import os

import jax
from absl import flags, logging


# What jax.distributed's SlurmCluster reads (jax/_src/clusters/slurm_cluster.py): process 0's
# host is the first of SLURM_STEP_NODELIST, the port 61440 + SLURM_JOB_ID % 4096 (or
# $JAX_COORDINATOR_PORT), and each process sees only the GPU numbered SLURM_LOCALID.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")


def _auto_cluster() -> str | None:
  """Which cluster jax.distributed can configure itself for: a SLURM step of several tasks, or
  any Cloud TPU VM (how many hosts and slices is in its metadata, which jax.distributed reads)."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    missing = [v for v in SLURM_VARIABLES if v not in os.environ]
    if missing:  # e.g. python started by the batch script itself, not by srun
      raise ValueError(
          f"SLURM job {os.environ['SLURM_JOB_ID']} has SLURM_NTASKS="
          f"{os.environ['SLURM_NTASKS']} but {', '.join(missing)} unset: start every process "
          "with srun (launch/slurm.sbatch does), or pass --coordinator_address, "
          "--num_processes and --process_id")
    return "SLURM"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host slice on GKE
    return "Cloud TPU"
  if _on_cloud_tpu_vm():  # hosts and slices (multislice) come from the VM's metadata
    return "Cloud TPU"
  return None


def _on_cloud_tpu_vm() -> bool:
  """Whether `import jax` found TPU chips and libtpu on a Cloud TPU VM. There the host and slice
  list is in the VM's metadata, not the environment, and jax.distributed reads it; one host
  alone becomes a 1-process job."""
  try:
    from jax._src import cloud_tpu_init
  except ImportError:  # a JAX that moved it: GKE's TPU_WORKER_HOSTNAMES or explicit flags
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _gloo_on_cpu() -> None:
  """CPU collectives across processes need gloo (the default CPU client has none)."""
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def define_flags() -> None:
  """--coordinator_address/--num_processes/--process_id, for the commands that join a job."""
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process "
                      "runs outside Cloud TPU / SLURM, where this is automatic).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.DEFINE_integer("heartbeat_timeout_seconds", None, "A process silent this long is taken "
                       "as dead and the job's other processes stop with an error (JAX's "
                       "default, 100 s, when unset).")


def initialize_from_flags() -> None:
  """initialize() with the values of define_flags()'s flags."""
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id,
             heartbeat_timeout_seconds=f.heartbeat_timeout_seconds)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_seconds: int | None = None
               ) -> None:
  """Joins the job's processes. Single-process runs need nothing and get nothing.

  Explicit `coordinator_address`/`num_processes`/`process_id` (e.g. `localhost:1234`, 2, 0)
  work anywhere, CPU included (with gloo collectives). Without them, jax.distributed
  configures itself on multi-host Cloud TPU slices and multi-task SLURM jobs.
  """
  extra = ({} if heartbeat_timeout_seconds is None else
           {"heartbeat_timeout_seconds": int(heartbeat_timeout_seconds)})
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
    _gloo_on_cpu()
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **extra)
  elif (cluster := _auto_cluster()) is not None:
    logging.info("Initialising jax.distributed for %s", cluster)
    _gloo_on_cpu()  # (CPU: SLURM runs without GPUs, and tests/test_slurm.py)
    jax.distributed.initialize(**extra)
  else:
    return
  logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
