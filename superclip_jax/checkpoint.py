"""Orbax checkpoints of the whole train state, and reading a workdir back for export/eval.

A workdir holds `config.json` (the run's config, written at start) and `checkpoints/<step>/`.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
crash mid-write never leaves a checkpoint that would be picked up; a restart restores the
latest complete one.
"""
from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"


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
  """Keeps the last `config.keep_ckpts` checkpoints, plus every `keep_ckpt_steps`-th."""

  def __init__(self, workdir: str, config):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_ckpts,
        keep_period=config.keep_ckpt_steps or None,
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a write killed midway
    )
    self.directory = epath.Path(workdir) / "checkpoints"
    self.manager = ocp.CheckpointManager(self.directory.absolute(), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices."""
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, abstract_state, step: int | None = None):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}")
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
