"""Resuming a workdir with another config: refuse what the checkpoints cannot hold, record the rest.

A workdir's `config.json` is the config of its latest run. Before a run writes anything, its
config is compared with that file (docs/training.md, "Resuming with another config"):
- fields that change the train state's shapes (`STATE_FIELDS`) are refused, naming each one;
- fields that change the optimizer state's structure (`OPTIMIZER_FIELDS`) are allowed: the
  parameters and counts are restored and the optimizer state starts afresh;
- seeds and data specs (`WARN_FIELDS`) are allowed with a warning;
- anything else (lr, total_steps, evals, schedule, ...) is allowed.
A changed config is kept: the previous `config.json` becomes `config.<step>.json`, the config
that trained up to that checkpoint step.
"""
from __future__ import annotations

import json

import jax
from absl import logging

from superclip_jax import checkpoint, fs

STATE_FIELDS = ("model.mode", "model.variant", "model.text_size", "model.image_size",
                "model.context_length", "model.vocab_size", "model.head_blocks",
                "model.scan_layers", "loss.contrastive")
# Only whether these are set matters to the state (a logit_bias parameter; a clipping stage).
STATE_PRESENCE_FIELDS = ("model.logit_bias",)
OPTIMIZER_FIELDS = ("frozen",)
OPTIMIZER_PRESENCE_FIELDS = ("grad_clip_norm",)
WARN_FIELDS = ("seed", "input.seed", "input.data", "input.demo.seed")


class ConfigMismatchError(ValueError):
  """The config changes the shapes of a workdir's checkpointed state."""


def flatten(config) -> dict:
  """{'model.variant': 'B/16', ...}: the JSON view of a ConfigDict or of a saved config."""
  tree = (config if isinstance(config, dict) else
          json.loads(config.to_json_best_effort(sort_keys=True)))
  out = {}

  def walk(node, prefix):
    if isinstance(node, dict) and node:
      for key, value in node.items():
        walk(value, f"{prefix}{key}.")
    else:
      out[prefix[:-1]] = node
  walk(tree, "")
  return out


def changes(saved: dict, new: dict) -> dict:
  """{field: (saved value, new value)} for every field that differs (absent: None)."""
  return {k: (saved.get(k), new.get(k)) for k in sorted(set(saved) | set(new))
          if saved.get(k) != new.get(k)}


def check_and_record(workdir: str, config, latest_step: int | None) -> dict:
  """Compares `config` with the workdir's `config.json`, then writes it (process 0).

  Returns the changed fields ({field: (saved, new)}); raises ConfigMismatchError, writing
  nothing, when checkpoints exist and a field in STATE_FIELDS differs.
  """
  path = fs.join(workdir, checkpoint.CONFIG_FILE)
  saved = fs.read_json(path) if fs.exists(path) else None
  diff = {} if saved is None else changes(flatten(saved), flatten(config))
  if latest_step is not None and "input.data" in diff:
    _check_source_count(workdir, latest_step, *diff["input.data"])
  if latest_step is not None and diff:
    shape = {k: v for k, v in diff.items() if k in STATE_FIELDS or (
        k in STATE_PRESENCE_FIELDS and (v[0] is None) != (v[1] is None))}
    if shape:
      lines = "\n".join(f"  {k}: {v[0]!r} (saved) -> {v[1]!r} (now)" for k, v in shape.items())
      raise ConfigMismatchError(
          f"{workdir} holds checkpoints (latest step {latest_step}) of a state these fields "
          f"change the shape of:\n{lines}\nStart the new config in a new --workdir (with "
          "config.init_from to carry weights over), or run with the saved values. Nothing in "
          f"{workdir} was changed.")
    for k, (old, new) in diff.items():
      if k in WARN_FIELDS:
        logging.warning("Resuming %s with %s changed: %r -> %r. The run continues from step "
                        "%d with the new value, so it is no longer one reproducible run.",
                        workdir, k, old, new, latest_step)
    logging.info("Resuming %s at step %d with a changed config (the previous one is kept as "
                 "config.%d.json): %s", workdir, latest_step, latest_step,
                 "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in diff.items()))
  if jax.process_count() > 1:  # every process has read the file before process 0 rewrites it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("superclip_jax: config.json compared")
  if diff and latest_step is not None and jax.process_index() == 0:
    kept = fs.join(workdir, f"config.{latest_step}.json")
    if not fs.exists(kept):
      fs.copy(path, kept)
  checkpoint.write_config(workdir, config)
  return diff


def _check_source_count(workdir, latest_step, saved, new) -> None:
  """The checkpoints' data position has one row per source: a mixture that gains or loses
  sources cannot resume from them (Orbax would call every intact checkpoint unusable)."""
  from superclip_jax.data import spec  # plain Python
  try:
    before, now = ([s for s, _ in spec.mixture(d)] for d in (saved, new))
  except (ValueError, TypeError):
    return  # validate() names what is wrong with the new spec
  if len(before) != len(now):
    raise ConfigMismatchError(
        f"config.input.data changes the mixture from {len(before)} source(s) {before} to "
        f"{len(now)} {now}, but {workdir} holds checkpoints (latest step {latest_step}) whose "
        f"data position has one row per source: resume with the saved config.input.data, or "
        f"train the new mixture in a new --workdir. The checkpoints are intact; nothing in "
        f"{workdir} was changed.")


def optimizer_changed(diff: dict) -> bool:
  """Whether the changes alter the optimizer state's structure (its values start afresh)."""
  return any(k in OPTIMIZER_FIELDS or (k in OPTIMIZER_PRESENCE_FIELDS and bool(v[0]) != bool(v[1]))
             for k, v in diff.items())
