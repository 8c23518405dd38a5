"""Stopping a run on a preemption notice or Ctrl-C, at one step every process agrees on.

SIGTERM (a TPU VM's preemption notice, SLURM's `--signal`, `timeout`, a GCE maintenance
event forwarded as one) and a first SIGINT (Ctrl-C) set a flag in the process they reach; a
second SIGINT aborts at once (KeyboardInterrupt), a second SIGTERM changes nothing, so a
final save is never cut short by a repeated notice. The handlers stay installed until the
loop has finished its last save (`restore`).

With several processes a notice may reach one of them, some, or all: a process that stopped
alone would leave the others in a collective forever. So every `check_every` steps all
processes agree, through jax.distributed's key-value store and a barrier (host RPCs: no
device synchronisation, nothing waits for the steps queued on the devices): a process that
has a notice writes a key under that step before the barrier, and after it every process
reads the same set of keys, so all stop after the same step. A peer that died (SIGKILL)
never reaches the barrier: the survivors leave it after `barrier_seconds` with an error
saying so, and a restart resumes from the last checkpoint (docs/training.md, "Preemption").
"""
from __future__ import annotations

import itertools
import signal

import jax
from absl import logging

_RUNS = itertools.count()  # one key prefix per loop in this process (all processes alike)


class PeerLostError(RuntimeError):
  """Another process of the job did not reach the preemption check in time."""


class Preemption:
  """`local`: a notice reached this process. `requested`: all processes stop after this step
  (set by `agree`, or directly by the loop for a stop every process makes alike)."""

  def __init__(self, check_every: int = 1, barrier_seconds: float = 600.0):
    self.local = self.requested = False
    self.check_every = max(int(check_every), 1)
    self.barrier_ms = int(barrier_seconds * 1000)
    self._prefix = f"superclip_jax/preemption/{next(_RUNS)}"
    self._previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (a test runner's thread): no handlers
        pass

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.local:
      raise KeyboardInterrupt  # a second Ctrl-C: abort now, without a save
    if not self.local:
      logging.warning("%s: stopping after the current step, with a checkpoint%s.",
                      signal.Signals(signum).name,
                      " (Ctrl-C again aborts without one)" if signum == signal.SIGINT else "")
    self.local = True
    if jax.process_count() == 1:
      self.requested = True

  def agree(self, step: int) -> bool:
    """Whether every process stops after `step`; call it after each step, in every process."""
    if self.requested or jax.process_count() == 1:
      return self.requested
    if step % self.check_every:
      return False
    from jax._src import distributed  # the job's coordination client (jax.distributed)
    client = distributed.global_state.client
    key = f"{self._prefix}/{step}"
    if self.local:
      client.key_value_set(f"{key}/{jax.process_index()}", "stop")
    try:
      client.wait_at_barrier(key, self.barrier_ms)
    except Exception as e:  # noqa: BLE001  the runtime's own error types vary by version
      raise PeerLostError(
          f"A process of this job did not reach the preemption check after step {step} within "
          f"{self.barrier_ms / 1000:.0f} s: it died or hangs ({e}). This process stops without "
          "a checkpoint; restart the job to resume from the last one.") from e
    signalled = client.key_value_dir_get(f"{key}/")
    if signalled:
      logging.warning("Stopping after step %d: a preemption notice reached process(es) %s.",
                      step, ", ".join(k.rsplit("/", 1)[-1] for k, _ in signalled))
      self.requested = True
    return self.requested

  def restore(self) -> None:
    """Puts the previous handlers back (after the last save has finished)."""
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
