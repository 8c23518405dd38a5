"""Opt-in glibc malloc settings that stop XLA:CPU from page-faulting its temporaries each step.

XLA:CPU allocates each step's temporaries (gigabytes at B/16) afresh. glibc serves allocations
that large with mmap and returns them with munmap, so every step touches every page of its
temporaries for the first time again: on the 2-core VMs here that is ~700k page faults and
about a third of the step's wall time at B/16, batch 8. Keeping large blocks on the heap and
never trimming it makes the second and later steps fault nothing (`docs/training.md`).

The price is that freed memory stays with the process: blocks of changing sizes (another
batch size, an evaluation between train steps) can fragment the heap, and its resident size
then grows past what glibc's default would need; `release()` hands free pages back. That is
why it is opt-in: `SUPERCLIP_JAX_MALLOC=tuned python -m superclip_jax.main ...`. The settings
only exist as `GLIBC_TUNABLES`, which glibc reads at process start (the `mallopt` equivalents
take an int, too small for blocks over 2 GiB), so `reexec()` restarts the process once with
them set: same interpreter, command line, environment and process id.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

OPT_IN = "SUPERCLIP_JAX_MALLOC"  # =tuned: use TUNABLES; =system (the default): glibc's own
_DONE = "SUPERCLIP_JAX_MALLOC_SET"  # set in the re-executed process
TUNABLES = ("glibc.malloc.arena_max=1"  # one arena: others cap at 64 MiB and mmap beyond
            ":glibc.malloc.mmap_threshold=17179869184"  # blocks up to 16 GiB from the heap
            ":glibc.malloc.trim_threshold=68719476736")  # never hand the heap back


def supported() -> bool:
  return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def wanted(environ=None) -> bool:
  """Whether reexec() would restart this process with TUNABLES.

  Raises ValueError for an unknown SUPERCLIP_JAX_MALLOC value, or 'tuned' where it cannot
  apply (not glibc, or glibc.malloc tunables already chosen by hand).
  """
  environ = os.environ if environ is None else environ
  value = environ.get(OPT_IN, "system")
  if value not in ("system", "tuned"):
    raise ValueError(f"{OPT_IN}={value!r}: use 'tuned' (docs/training.md) or 'system'")
  if value == "system" or environ.get(_DONE):
    return False
  if not supported():
    raise ValueError(f"{OPT_IN}=tuned needs Linux with glibc (this is {sys.platform}, "
                     f"{platform.libc_ver()[0] or 'another libc'}); unset it")
  if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
    raise ValueError(f"{OPT_IN}=tuned, but GLIBC_TUNABLES already sets glibc.malloc.* "
                     f"({environ['GLIBC_TUNABLES']}); keep one of the two")
  return True


def environment(environ=None) -> dict:
  """A copy of `environ` with TUNABLES added to GLIBC_TUNABLES."""
  env = dict(os.environ if environ is None else environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), TUNABLES) if t)
  env[_DONE] = "1"
  return env


def active() -> bool:
  """Whether this process runs with TUNABLES (set by reexec or by hand)."""
  return TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


def reexec() -> None:
  """Restarts this process with TUNABLES if SUPERCLIP_JAX_MALLOC=tuned asks for it.

  Call it first thing in an entry point, before anything worth keeping has happened.
  """
  try:
    if not wanted():
      return
  except ValueError as e:
    sys.exit(f"error: {e}")
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), environment())


def release() -> bool:
  """Returns the heap's free pages to the OS (glibc malloc_trim); True if any were.

  Call it where the sizes of what is allocated change (between batch sizes, after an
  evaluation), not every step: the next step faults those pages in again.
  """
  if not supported():
    return False
  return bool(ctypes.CDLL("libc.so.6").malloc_trim(ctypes.c_size_t(0)))
