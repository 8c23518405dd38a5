"""Orbax checkpoints of the whole train state, and reading a workdir back for export/eval.

A workdir holds `config.json` (the run's config, written at start) and `checkpoints/<step>/`.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
crash mid-write never leaves a checkpoint that would be picked up. Each checkpoint also
carries a fingerprint of its state (`fingerprint`, in its Orbax metadata), which a restore
checks, together with the state's finiteness: damaged bytes are found before they are
trained on. A restart restores the newest checkpoint that reads and verifies
(`Checkpointer.restore_newest_good`), moving the ones that do not to `unusable_checkpoints/`.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import logging as std_logging
import os
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from superclip_jax import fs, train_step

CONFIG_FILE = "config.json"
UNUSABLE_DIR = "unusable_checkpoints"  # checkpoints that failed to restore, moved aside
# Train-state fields added after checkpoints were first written: zeros when a checkpoint has
# none (their meaning at zero is what older runs did).
_ZEROS_IF_ABSENT = ("data_origin",)


def write_config(workdir: str, config) -> None:
  if jax.process_index() == 0:
    fs.makedirs(workdir)
    fs.write_text(fs.join(workdir, CONFIG_FILE),
                  config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = fs.join(workdir, CONFIG_FILE)
  if not fs.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a superclip_jax workdir?")
  return ml_collections.ConfigDict(fs.read_json(path))


class Checkpointer:
  """Keeps the last `config.keep_ckpts` checkpoints, every `keep_ckpt_steps`-th, and the step
  `save(keep=...)` names (the last one before a non-finite streak, `nonfinite.Guard`)."""

  def __init__(self, workdir: str, config):
    self._kept = _KeepSteps()
    policies = [ocp.checkpoint_managers.LatestN(n=config.keep_ckpts), self._kept]
    if config.keep_ckpt_steps:
      policies.append(ocp.checkpoint_managers.EveryNSteps(config.keep_ckpt_steps))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a write killed midway
    )
    self.workdir = workdir
    self._pending = None  # the step of the save in flight
    self._failed = False  # a save failed and was reported
    _install_quiet_hooks()
    self.directory = fs.join(workdir, "checkpoints")
    if not fs.is_url(workdir):  # Orbax wants an absolute path; a URL is taken as it is
      self.directory = os.path.abspath(self.directory)
    # The handler named up front: reading a checkpoint's metadata before any save needs it.
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, metadata: dict | None = None, keep: int | None = None
           ) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices.

    metadata: JSON kept with the checkpoint (`metadata`). keep: a step the rotation keeps
    besides the last `keep_ckpts` (the last good one before a non-finite streak).
    """
    self._kept.steps = set() if keep is None else {keep}
    if self._pending is not None:  # Orbax would wait for it too; a failure is told as ours
      self._finish()
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True,
                      custom_metadata=metadata or {})
    self._pending = step

  def check(self) -> None:
    """Raises CheckpointSaveError (one line) once the asynchronous save in flight has failed,
    e.g. on a full disk; costs next to nothing while it runs, so the loop calls it every step."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._finish()

  def _finish(self) -> None:
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  Orbax / TensorStore: the write failed
      self._failed = _set_save_failed()
      raise self._save_error(step, e) from None
    if not self._committed(step):
      self._failed = _set_save_failed()
      raise self._save_error(step, None)

  def _committed(self, step: int) -> bool:
    path = fs.join(self.directory, str(step))
    if fs.is_url(path):  # object stores: Orbax marks a complete checkpoint with this file
      return fs.exists(fs.join(path, "commit_success.txt"))
    return os.path.isdir(path)

  def _save_error(self, step: int, error) -> "CheckpointSaveError":
    reason = "it was not committed" if error is None else " ".join(str(error).split())
    code = re.search(r"os_error_code='(\d+)'", reason)  # TensorStore's errno
    code = int(code[1]) if code else None
    full = code in (errno.ENOSPC, errno.EFBIG) or any(
        s in reason for s in ("No space left", "File too large", "quota", "Quota"))
    if len(reason) > 500:  # the storage's own words (errno) come last
      reason = f"{reason[:200]} ... {reason[-250:]}"
    if code is not None and os.strerror(code) not in reason:  # the cut may have dropped them
      reason = f"{reason} ({os.strerror(code)})"
    earlier = [s for s in self.all_steps() if s < step and self._committed(s)]
    where = (f"The checkpoints written before it are intact (latest: step {max(earlier)}); "
             f"restart with the same command once fixed and the run resumes from there."
             if earlier else "No earlier checkpoint exists: a restart starts from the beginning.")
    return CheckpointSaveError(
        f"Saving the checkpoint of step {step} in {self.directory} failed: {reason}. "
        + ("The disk, a quota or a file-size limit is full: free space. " if full else "")
        + f"The run stopped here rather than train on without checkpoints. {where}")

  def save_verified(self, step: int, state, metadata: dict | None = None,
                    keep: int | None = None) -> None:
    """`save`, with the state's fingerprint in the metadata for `restore` to check."""
    self.save(step, state, {**(metadata or {}), FINGERPRINT_KEY: fingerprint(state)}, keep)

  def metadata(self, step: int) -> dict:
    """The `metadata` saved with a step ({} for checkpoints written without)."""
    return dict(self.manager.metadata(step).custom_metadata or {})

  def restore(self, abstract_state, step: int | None = None):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    Any mesh or device count may have written the checkpoint: each array is read straight
    into the target's shards. The data-position table comes back with the shape it was saved
    with ([processes that wrote it, sources, 2]; `position.resume_position` maps it to
    this run), and a state field newer than the checkpoint (`data_origin`) starts at zeros.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}")
    saved = self.manager.item_metadata(step).tree  # {field: metadata tree}
    target, absent = {}, {}
    for field in dataclasses.fields(abstract_state):
      leaf = getattr(abstract_state, field.name)
      if field.name not in saved:
        if field.name not in _ZEROS_IF_ABSENT:
          raise ValueError(f"checkpoint {fs.join(self.directory, str(step))} has no {field.name!r}")
        absent[field.name] = jax.jit(functools.partial(jnp.zeros, leaf.shape, leaf.dtype),
                                     out_shardings=leaf.sharding)()
        continue
      if field.name == "data_position" and tuple(saved[field.name].shape) != leaf.shape:
        leaf = jax.ShapeDtypeStruct(tuple(saved[field.name].shape), leaf.dtype,
                                    sharding=leaf.sharding)
      target[field.name] = leaf
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    _verify(restored, self.metadata(step).get(FINGERPRINT_KEY), fs.join(self.directory, str(step)))
    return type(abstract_state)(**restored, **absent)

  def restore_newest_good(self, abstract_state, allow_none: bool = False):
    """(state, step) of the newest checkpoint that restores and verifies; (None, None) if
    there is none.

    A checkpoint that fails (unreadable, damaged, not finite) is logged with the reason and
    moved to WORKDIR/unusable_checkpoints/ (never deleted: the run will write its step
    again). When checkpoints exist and none is usable, raises UnusableCheckpointsError unless
    `allow_none` (config.ignore_unusable_checkpoints).
    """
    failed = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(abstract_state, step)
        error = None
      except Exception as e:  # noqa: BLE001  Orbax / TensorStore / our checks: all mean unusable
        state, error = None, e
      if jax.process_count() > 1:  # usable only if every process could read its part
        from jax.experimental import multihost_utils
        ok = multihost_utils.process_allgather(np.int32(error is None))
        if error is None and not np.all(ok):
          state, error = None, UnusableCheckpointError("another process could not read it")
      if error is None:
        if failed:
          self._move_aside(failed)
        return state, step
      failed.append((step, _reason(error)))
      logging.warning("Checkpoint %s is unusable, trying an older one: %s",
                      fs.join(self.directory, str(step)), _reason(error))
    if not failed:
      return None, None
    listing = "\n".join(f"  step {s}: {why}" for s, why in failed)
    if not allow_none:
      raise UnusableCheckpointsError(
          f"{self.directory} holds checkpoints, but none is usable:\n{listing}\nNothing "
          "was changed. Restore them from a copy, or set "
          "config.ignore_unusable_checkpoints=True to move them to "
          f"{fs.join(fs.parent(self.directory), UNUSABLE_DIR)} and start again (from "
          "config.init_from, if set, or from scratch).")
    self._move_aside(failed)
    return None, None

  def _move_aside(self, failed) -> None:
    """Moves unusable checkpoints out of the manager's sight; a save may write their step."""
    target = fs.join(fs.parent(self.directory), UNUSABLE_DIR)
    if jax.process_index() == 0:
      fs.makedirs(target)
      for step, why in failed:
        dest = fs.join(target, str(step))
        n = 1
        while fs.exists(dest):
          n += 1
          dest = fs.join(target, f"{step}.{n}")
        fs.move_tree(fs.join(self.directory, str(step)), dest)
        logging.warning("Moved the unusable checkpoint of step %d to %s (%s)", step, dest, why)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("superclip_jax: unusable checkpoints moved")
    self.manager.reload()

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed."""
    if self._pending is not None:
      self._finish()
    elif not self._failed:
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight, then lets go of Orbax's threads. After a reported save
    failure it only lets go (the error was raised once)."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001  the failed save again, already reported
        if not self._failed:
          raise


def _after_failed_write(value) -> bool:
  """Whether an exception is the aftermath of a failed asynchronous write: TensorStore's
  callbacks into an event loop that the failure closed, or Orbax's write coroutines collected
  at exit. Each would print a traceback (thousands on a full disk), after the one that counts.
  """
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  return _SAVE_FAILED and isinstance(value, ImportError) and "shutting down" in str(value)


def _install_quiet_hooks() -> None:
  if getattr(sys.excepthook, "_superclip_quiet", False):
    return
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(kind, value, tb):
    if not _after_failed_write(value):
      excepthook(kind, value, tb)

  def quiet_unraisablehook(info):
    if not _after_failed_write(info.exc_value):
      unraisablehook(info)

  quiet_excepthook._superclip_quiet = True
  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def orbax_errors_in_one_line() -> None:
  """Orbax's error log records without their tracebacks, one line each (main's default; any
  --verbosity keeps them whole). A failed write logs the same traceback from several threads,
  and CheckpointSaveError says what happened and what to do."""
  class OneLine(std_logging.Filter):
    def filter(self, record):
      if "/orbax/" in record.pathname and record.levelno >= std_logging.ERROR:
        record.exc_info = record.exc_text = None
        message = record.getMessage().splitlines()
        record.msg, record.args = (message[0][:300] if message else ""), None
      return True

  std_logging.getLogger("absl").addFilter(OneLine())


_SAVE_FAILED = False  # set once a save failed (and was reported): its aftermath is quiet


def _set_save_failed() -> bool:
  """From now on, the failed write's leftovers (asyncio's unretrieved task errors, coroutines
  never awaited) are not printed: the failure was reported once, as CheckpointSaveError."""
  global _SAVE_FAILED
  if not _SAVE_FAILED:
    _SAVE_FAILED = True
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
  return True


class CheckpointSaveError(RuntimeError):
  """An asynchronous checkpoint save failed (full disk, lost storage): stop, say so once."""


class UnusableCheckpointError(ValueError):
  """A checkpoint whose bytes do not match its fingerprint, or whose state is not finite."""


class UnusableCheckpointsError(ValueError):
  """Checkpoints exist, but none restores and verifies."""


FINGERPRINT_KEY = "fingerprint"


def fingerprint(state) -> dict[str, list[int]]:
  """{leaf path: [sum, position-weighted sum]} of the state's bits, as uint32 (mod 2**32).

  Integer sums do not depend on the order of addition, so any mesh and sharding give the same
  fingerprint; the weighted sum also catches values moved within an array. One pass over the
  state on its devices, then a few bytes per leaf to the host.
  """
  if dataclasses.is_dataclass(state):  # named by field, as the restored dict is
    state = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  paths, leaves = _named_leaves(state)
  sums = jax.device_get(_fingerprint_sums(leaves))
  return {p: [int(a), int(b)] for p, (a, b) in zip(paths, sums)}


def _named_leaves(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [jax.tree_util.keystr(p) for p, _ in flat], [x for _, x in flat]


@jax.jit
def _fingerprint_sums(leaves):
  return [_sums(x) for x in leaves]


def _sums(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 8:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  if words.ndim == 0:
    return words, words
  index = jnp.zeros(words.shape, jnp.uint32)  # row-major position, without a reshape
  stride = 1
  for axis in reversed(range(words.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
    stride = (stride * words.shape[axis]) % 2**32
  return jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


_all_finite = jax.jit(train_step.all_finite)  # the train step's own check of what it keeps


def _verify(restored: dict, saved: dict | None, where) -> None:
  """Raises UnusableCheckpointError when `restored` differs from the fingerprint taken at
  save time (None: a checkpoint written before fingerprints; only finiteness is checked)."""
  if saved is not None:
    now = fingerprint(restored)
    differ = [p for p, v in now.items() if p in saved and list(saved[p]) != v]
    if differ:
      raise UnusableCheckpointError(
          f"{where}: the bytes of {len(differ)} arrays differ from what was saved "
          f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}): the files were "
          "damaged after writing")
  if not bool(_all_finite(_named_leaves(restored)[1])):
    raise UnusableCheckpointError(f"{where}: the restored state has NaN or Inf values (no "
                                  "trained state has them: the files were damaged)")


def _reason(error: BaseException) -> str:
  """One line: the error's type and the first line of its message."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


class _KeepSteps:
  """An Orbax preservation policy keeping the steps in `steps` (changed between saves)."""

  def __init__(self):
    self.steps = set()

  def should_preserve(self, checkpoints, *, context):
    del context
    return [info.step in self.steps for info in checkpoints]


def load_state(workdir: str, step: int | None = None, mesh=None):
  """(config, StateFactory, TrainState) from a workdir, on `mesh` (default: all devices)."""
  from superclip_jax import sharding, train_state  # avoid a cycle at import time

  config = read_config(workdir)
  mesh = mesh or sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  ckpt = Checkpointer(workdir, config)
  try:
    state = ckpt.restore(factory.abstract_with_shardings(), step)
  finally:
    ckpt.close()
  return config, factory, state


def load_params(workdir: str, step: int | None = None):
  """(config, params as numpy, idf, step) for export and inference; step None: the latest.

  idf: {'doc_freq': float64 [vocab], 'num_docs': float} — exact counts as float64.
  """
  config, _, state = load_state(workdir, step, mesh=_single_device_mesh())
  params = jax.tree.map(np.asarray, state.params)
  idf = {"doc_freq": np.asarray(state.idf.doc_freq.value(), np.float64),
         "num_docs": float(state.idf.num_docs.value())}
  return config, params, idf, int(state.step)


def _single_device_mesh():
  from jax.sharding import Mesh
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
