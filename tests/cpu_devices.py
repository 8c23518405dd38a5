"""Subprocesses on N forced CPU devices (XLA_FLAGS must be set before jax starts)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(devices: int) -> dict:
  """This environment with `devices` CPU devices per process and the repo importable."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu",
              PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def run_script(script: str, devices: int = 8, args=(), timeout: int = 900):
  """Runs `python -c script *args` from the repo root; asserts it exits 0 printing 'OK'."""
  r = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                     env=env(devices), capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]
  return r
