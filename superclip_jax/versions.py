"""The software and devices a run uses: printed at start-up, kept in the workdir for bug reports."""
from __future__ import annotations

import importlib.metadata
import json
import platform

import jax

from superclip_jax import fs

VERSIONS_FILE = "versions.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "ml-collections",
            "tensorflow-cpu", "tensorflow", "numpy")


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def collect() -> dict:
  """python, package versions (absent ones left out), backend, device kind and counts."""
  devices = jax.devices()
  info = {"python": platform.python_version()}
  info.update({p: v for p in PACKAGES if (v := _version(p)) is not None})
  info.update(backend=jax.default_backend(), device_kind=devices[0].device_kind,
              device_count=len(devices), local_device_count=jax.local_device_count(),
              process_count=jax.process_count())
  return info


def summary(info: dict) -> str:
  """One line: 'python 3.11.7 | jax 0.10.2 | ... | cpu: 8 x cpu (1 process)'."""
  packages = " | ".join(f"{k} {v}" for k, v in info.items()
                        if k not in ("backend", "device_kind", "device_count",
                                     "local_device_count", "process_count"))
  return (f"{packages} | {info['backend']}: {info['device_count']} x {info['device_kind']} "
          f"({info['process_count']} process{'es' * (info['process_count'] > 1)})")


def write(workdir: str, info: dict) -> None:
  """Writes `versions.json` into the workdir (process 0 only)."""
  if jax.process_index() == 0:
    fs.makedirs(workdir)
    fs.write_text(fs.join(workdir, VERSIONS_FILE), json.dumps(info, indent=2, sort_keys=True))
