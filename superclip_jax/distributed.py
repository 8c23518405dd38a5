"""Starting JAX's multi-process runtime: explicit flags, or automatic on Cloud TPU and SLURM."""
from __future__ import annotations

import os

import jax
from absl import flags, logging


def _auto_cluster() -> str | None:
  """Which cluster jax.distributed can configure itself for, if this is a multi-process job."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return "SLURM"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host Cloud TPU slice
    return "Cloud TPU"
  return None


def define_flags() -> None:
  """--coordinator_address/--num_processes/--process_id, for the commands that join a job."""
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process "
                      "runs outside Cloud TPU / SLURM, where this is automatic).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def initialize_from_flags() -> None:
  """initialize() with the values of define_flags()'s flags."""
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the job's processes. Single-process runs need nothing and get nothing.

  Explicit `coordinator_address`/`num_processes`/`process_id` (e.g. `localhost:1234`, 2, 0)
  work anywhere, CPU included (with gloo collectives). Without them, jax.distributed
  configures itself on multi-host Cloud TPU slices and multi-task SLURM jobs.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif (cluster := _auto_cluster()) is not None:
    logging.info("Initialising jax.distributed for %s", cluster)
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
