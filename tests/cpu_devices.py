"""Subprocesses on N forced CPU devices (XLA_FLAGS must be set before jax starts)."""
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One persistent JAX compilation cache per pytest worker, for the trainer subprocesses: each
# `superclip_jax.main`/`evaluate` process would otherwise compile the same small programs again
# (half of such a process's time). Not for scripts that read compiled HLO or memory: a cache hit
# deserialises the executable, and its HLO text differs.
JAX_CACHE = os.path.join(tempfile.gettempdir(), "superclip_jax_tests_jax_cache",
                         os.environ.get("PYTEST_XDIST_WORKER", "main"))


def compile_cache(environ: dict) -> dict:
  """`environ` with the tests' persistent compilation cache (JAX reads these at import)."""
  return dict(environ, JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def env(devices: int, cached: bool = False) -> dict:
  """This environment with `devices` CPU devices per process and the repo importable (and,
  if `cached`, the compilation cache above)."""
  out = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHON=sys.executable,  # launch/local_processes.sh's python
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  return compile_cache(out) if cached else out


def run_script(script: str, devices: int = 8, args=(), timeout: int = 900):
  """Runs `python -c script *args` from the repo root; asserts it exits 0 printing 'OK'."""
  r = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                     env=env(devices), capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]
  return r
