"""One trainer per workdir: an exclusive lease file, `WORKDIR/train.lock`, refreshed while held.

The lease (JSON: host, pid, start and refresh times, a token) is created atomically and
rewritten every `REFRESH_SECONDS` by a daemon thread. Another trainer refuses to start while it
is there, naming the holder, and takes it over only when it is provably stale: on the same
host with its process gone, or not refreshed for `STALE_SECONDS` (any host; this assumes the
hosts' clocks agree to well within that). Multi-process jobs take it once, on process 0.
Creation is atomic on local and network file systems (written whole, then hard-linked into
place; O_EXCL without hard links) and on gs:// when
google-cloud-storage is installed (a generation-conditional write); elsewhere it is a check
then a write, which two starts in the same second can both pass (docs/training.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging

from superclip_jax import fs

LOCK_FILE = "train.lock"
REFRESH_SECONDS = 60.0
STALE_SECONDS = 600.0
WRITE_GRACE = 10.0  # seconds an empty or unreadable lease counts as being written
_HELD = set()  # tokens of the leases this process holds


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir."""


@contextlib.contextmanager
def hold(workdir: str, *, refresh: float = REFRESH_SECONDS, stale: float = STALE_SECONDS):
  """Holds the workdir's lease for the block (process 0; the others learn whether it did)."""
  lease = error = None
  if jax.process_index() == 0:
    try:
      lease = _Lease(workdir, refresh, stale)
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
      error = error or WorkdirLockedError(f"{workdir} is held by another trainer (process 0 "
                                          "of this job could not take its lock)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lease is not None:
      lease.release()


class _Lease:
  """Takes the lease file or raises WorkdirLockedError; refreshes it until `release`."""

  def __init__(self, workdir: str, refresh: float, stale: float):
    path = fs.join(workdir, LOCK_FILE)
    self.path, self.refresh, self.stale = path, refresh, stale
    _make_workdir(workdir)
    self.info = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
                 "refreshed": time.time(), "token": uuid.uuid4().hex}
    for _ in range(3):  # a takeover races another starter at most a few times
      try:
        created = _create(path, json.dumps(self.info))
      except OSError as e:  # read-only, no permission, no space: before anything else is written
        raise WorkdirError(f"--workdir={workdir} is not writable: creating {path} failed "
                           f"({e.strerror or e}). Use a directory this user can write") from None
      if created:
        break
      holder = _read(path)
      why = self._stale(holder)
      if why is None and not holder:
        raise WorkdirLockedError(
            f"{workdir} is being taken by another trainer: its lease {path} is still being "
            f"written. Stop that trainer, or use another --workdir.")
      if why is None:
        raise WorkdirLockedError(
            f"{workdir} is in use by a trainer on host {holder.get('host')!r}, pid "
            f"{holder.get('pid')}, running since {_when(holder.get('start'))} (lease refreshed "
            f"{_when(holder.get('refreshed'))}). Stop it, or use another --workdir. If that "
            f"trainer is gone, the lease is taken over once it is {stale:.0f} s old, or "
            f"delete {path} by hand.")
      logging.warning("Taking over the stale lock %s (%s): %s", path, why, holder)
      _remove_if(path, holder)
    else:
      raise WorkdirLockedError(f"could not take {path}: other trainers keep taking it")
    _HELD.add(self.info["token"])
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._keep, daemon=True, name="workdir-lock")
    self._thread.start()

  def _stale(self, holder: dict) -> str | None:
    """Why the holder's lease is stale, or None when it may be alive."""
    if not holder:
      # A lease this young may still be being written by a starter that just created it
      # (storage without hard links: created, then written); a crashed writer's is older.
      with contextlib.suppress(OSError):
        if not fs.is_url(self.path) and time.time() - os.path.getmtime(self.path) < WRITE_GRACE:
          return None
      return "unreadable or empty lease"
    if holder.get("host") == socket.gethostname():
      pid = holder.get("pid")
      if pid == os.getpid():
        return None if holder.get("token") in _HELD else "left by this process before"
      if not _pid_alive(pid):
        return f"process {pid} is gone"
    age = time.time() - float(holder.get("refreshed") or 0)
    return f"not refreshed for {age:.0f} s" if age > self.stale else None

  def _keep(self):
    while not self._stop.wait(self.refresh):
      try:
        if _read(self.path).get("token") != self.info["token"]:
          logging.error("The lock %s was taken over by another trainer: two trainers now "
                        "share the workdir", self.path)
          return
        self.info["refreshed"] = time.time()
        fs.write_text(self.path, json.dumps(self.info))
      except Exception as e:  # a storage hiccup: the next refresh tries again
        logging.warning("Could not refresh %s: %s", self.path, e)

  def release(self):
    self._stop.set()
    self._thread.join(timeout=10)
    _HELD.discard(self.info["token"])
    _remove_if(self.path, self.info)


class WorkdirError(ValueError):
  """The workdir cannot be used at all (a file, not writable); the message says which."""


def _make_workdir(workdir: str) -> None:
  if fs.exists(workdir) and not fs.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory: name a directory "
                       "(it is created if missing)")
  try:
    fs.makedirs(workdir)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created ({e.strerror or e}; "
                       f"{e.filename or workdir}). Use a directory this user can write") from None


def _create(path: str, text: str) -> bool:
  """Creates `path` with `text` unless it exists, atomically where the storage allows.

  Locally the lease is written whole to a temporary file first and then hard-linked into
  place (the link fails if `path` exists): `path` never exists empty or half-written, so a
  racing starter never reads a lease being created as an unreadable, stale one. Where hard
  links are not supported, O_EXCL creation, then the write.
  """
  if not fs.is_url(path):
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
      f.write(text)
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
    except OSError:  # no hard links on this file system
      pass
    finally:
      os.remove(tmp)
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
  if path.startswith("gs://"):
    try:
      from google.api_core import exceptions
      from google.cloud import storage
    except ImportError:
      storage = None
    if storage is not None:
      bucket, _, blob = path[len("gs://"):].partition("/")
      try:  # generation 0: only if no object exists
        storage.Client().bucket(bucket).blob(blob).upload_from_string(text, if_generation_match=0)
        return True
      except exceptions.PreconditionFailed:
        return False
  if fs.exists(path):  # other URL filesystems: no atomic create-if-absent
    return False
  fs.write_text(path, text)
  return True


def _read(path: str) -> dict:
  try:
    return json.loads(fs.read_text(path))
  except (FileNotFoundError, ValueError):
    return {}


def _remove_if(path: str, holder: dict) -> None:
  """Removes the lease if it still is `holder`'s (a takeover removes only the stale one)."""
  if _read(path).get("token") == holder.get("token"):
    with contextlib.suppress(FileNotFoundError):
      fs.remove(path)


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True  # someone else's process, or no pid to check: not provably gone
  return True


def _when(seconds) -> str:
  if not seconds:
    return "?"
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(seconds)))
