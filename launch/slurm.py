#!/usr/bin/env python3
"""Submit launch/slurm.sbatch with one task per GPU (what JAX's SLURM detection expects).

  python launch/slurm.py --nodes=4 --gpus-per-node=8 --partition=gpu --time=24:00:00 -- \\
      --config=configs/b16.py --workdir=/shared/runs/b16 --config.input.data='wds:...'

Flags before `--` are sbatch's (these few; --sbatch-arg=... passes any other), everything
after is superclip_jax.main's. --dry-run prints the sbatch command and the srun command the job
will run, and submits nothing. Standard library only.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm.sbatch")


def sbatch_command(a, trainer_args: list[str]) -> list[str]:
  cmd = ["sbatch", f"--nodes={a.nodes}", f"--gpus-per-node={a.gpus_per_node}",
         f"--ntasks-per-node={a.gpus_per_node}", f"--time={a.time}",
         f"--job-name={a.job_name}"]
  for flag in ("partition", "account", "cpus_per_task"):
    if getattr(a, flag) is not None:
      cmd.append(f"--{flag.replace('_', '-')}={getattr(a, flag)}")
  return cmd + list(a.sbatch_arg) + [SCRIPT, *trainer_args]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  trainer_args = []
  if "--" in argv:
    i = argv.index("--")
    argv, trainer_args = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus-per-node", type=int, default=8, help="also the tasks per node")
  p.add_argument("--time", default="24:00:00", help="each run's limit; it requeues itself after")
  p.add_argument("--job-name", default="superclip")
  p.add_argument("--partition")
  p.add_argument("--account")
  p.add_argument("--cpus-per-task", type=int, help="per GPU, for the input pipeline")
  p.add_argument("--sbatch-arg", action="append", default=[], help="any other sbatch option, "
                 "e.g. --sbatch-arg=--qos=high (repeatable)")
  p.add_argument("--dry-run", action="store_true", help="print the commands, submit nothing")
  a = p.parse_args(argv)
  for flag in ("--config=", "--workdir="):
    if not any(t.startswith(flag) for t in trainer_args):
      p.error(f"after --, superclip_jax.main needs {flag}...: e.g. -- --config=configs/b16.py "
              "--workdir=/shared/runs/b16")
  if a.nodes < 1 or a.gpus_per_node < 1:
    p.error(f"--nodes={a.nodes} and --gpus-per-node={a.gpus_per_node} must be at least 1")
  cmd = sbatch_command(a, trainer_args)
  if not a.dry_run:
    return subprocess.run(cmd).returncode
  print(shlex.join(cmd))
  print(f"# the job's script then runs (srun starts superclip_jax.main as each of its "
        f"{a.nodes} x {a.gpus_per_node} tasks):")
  env = dict(os.environ, SUPERCLIP_DRY_RUN="1")
  r = subprocess.run(["bash", SCRIPT, *trainer_args], env=env, capture_output=True, text=True)
  sys.stdout.write(r.stdout)
  sys.stderr.write(r.stderr)
  return r.returncode


if __name__ == "__main__":
  sys.exit(main())
