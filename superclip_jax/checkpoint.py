"""Orbax checkpoints of the whole train state, and reading a workdir back for export/eval.

A workdir holds `config.json` (the run's config, written at start) and `checkpoints/<step>/`.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
crash mid-write never leaves a checkpoint that would be picked up; a restart restores the
latest complete one.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"
# Train-state fields added after checkpoints were first written: zeros when a checkpoint has
# none (their meaning at zero is what older runs did).
_ZEROS_IF_ABSENT = ("data_origin",)


def write_config(workdir: str, config) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a superclip_jax workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


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
    self.directory = epath.Path(workdir) / "checkpoints"
    # The handler named up front: reading a checkpoint's metadata before any save needs it.
    self.manager = ocp.CheckpointManager(self.directory.absolute(), options=options,
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
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True,
                      custom_metadata=metadata or {})

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
          raise ValueError(f"checkpoint {self.directory / str(step)} has no {field.name!r}")
        absent[field.name] = jax.jit(functools.partial(jnp.zeros, leaf.shape, leaf.dtype),
                                     out_shardings=leaf.sharding)()
        continue
      if field.name == "data_position" and tuple(saved[field.name].shape) != leaf.shape:
        leaf = jax.ShapeDtypeStruct(tuple(saved[field.name].shape), leaf.dtype,
                                    sharding=leaf.sharding)
      target[field.name] = leaf
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    return type(abstract_state)(**restored, **absent)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
  """(config, params as numpy, idf) for export and inference.

  idf: {'doc_freq': float64 [vocab], 'num_docs': float} — exact counts as float64.
  """
  config, _, state = load_state(workdir, step, mesh=_single_device_mesh())
  params = jax.tree.map(np.asarray, state.params)
  idf = {"doc_freq": np.asarray(state.idf.doc_freq.value(), np.float64),
         "num_docs": float(state.idf.num_docs.value())}
  return config, params, idf


def _single_device_mesh():
  from jax.sharding import Mesh
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
