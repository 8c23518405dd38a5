"""The data position: which records each process reads, and how a run resumes exactly.

No TensorFlow here (numpy and jax only): the train state imports this file for its shapes, and
the jitted train step calls `advance_position`. docs/data.md tells the same story with examples.

1. Items. A file source is a sequence of items (the shards of a tar/TFRecord source, the files
   of an image folder). Epoch e of it is a seeded permutation of all items, the epochs are
   concatenated, and process p of P takes items p, p+P, p+2P, ... (`process_items`): within an
   epoch no two processes read the same item, and every process gets the same number (+-1)
   however the counts divide, even with fewer items than processes. A stream may start at a
   global item `origin` (epoch, item) instead of the beginning: process p then takes
   origin + p, origin + p + P, ...

2. Groups. A process reads its items in groups (`cycle_length` shards interleaved, then
   shuffled through `shuffle_buffer` with a seed of the group; 4096 files of a folder; one
   epoch pass of a TFDS split). Record r of group g has the position (g, r), and a stream
   restarted at (g, r) yields exactly what followed it: only group g is re-read to get there.
   Each example carries `_position` int32 [4] = (process, source, group, offset).

3. Seeds. Shuffles draw from `stream_seed(seed, source, process)`; crops and caption choices
   from a hash of the record's position (`transforms.position_uniforms`), so a record is
   augmented the same way whenever it is read. Bad records are dropped before a position is
   consumed, and a mixture's choice for a process's n-th example depends only on n.

4. The table. The train state holds `data_position` int32 [processes, sources, 2], the
   (group, offset) of each (process, source)'s next unread record, which the train step
   advances with `advance_position`, and `data_origin` int32 [sources, 2]. A restarted run
   hands both (and examples_seen) back to `input_pipeline.train_dataset`, which continues each
   source from `this_process_position`: no repeats, no skips.

5. Another process count. `resume_position` maps a saved table to the new count: the demo is
   exact (it depends on examples_seen only); file sources follow
   config.input.on_process_count_change: 'error' (default), or 'restart', where every new
   process starts at the first item some old process had not finished
   (`restart_at_first_unfinished`; a TFDS source, split per process, at the least advanced
   old process's group: `restart_at_least_advanced_group`). Items are re-read, never skipped;
   the new origin makes later resumes with the new count exact again.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from superclip_jax.data import spec

PROCESS_COUNT_POLICIES = ("error", "restart")


def data_seed(config) -> int:
  seed = config.input.get("seed", None)
  return int(config.seed if seed is None else seed)


def local_batch_size(global_batch: int, process_count: int | None = None) -> int:
  n = jax.process_count() if process_count is None else process_count
  if global_batch % n:
    raise ValueError(f"input.batch_size={global_batch} is not divisible by the number of "
                     f"processes ({n}); choose a multiple of {n}")
  return global_batch // n


def num_sources(config) -> int:
  return len(spec.mixture(config.input.data))


# ---------------------------------------------------------------------------------------------
# The train state's shapes.

def position_shape(config, process_count: int | None = None) -> tuple[int, int, int]:
  """Shape of the train state's data-position table: [processes, sources, 2]."""
  return (jax.process_count() if process_count is None else process_count,
          num_sources(config), 2)


def initial_position(config, process_count: int | None = None) -> np.ndarray:
  """The data-position table of a fresh run (every source at its start)."""
  return np.zeros(position_shape(config, process_count), np.int32)


def origin_shape(config) -> tuple[int, int]:
  """Shape of the train state's data origin: [sources, 2], each source's (epoch, item)."""
  return (num_sources(config), 2)


# ---------------------------------------------------------------------------------------------
# Which items a process reads, and its seeds.

@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_items: int, seed: int, source_index: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, source_index, epoch]).permutation(num_items)


def process_items(num_items: int, seed: int, source_index: int, process_index: int,
                  process_count: int, first: int, count: int, origin: int = 0) -> np.ndarray:
  """Item indices first..first+count-1 of this process's endless sequence.

  The global sequence is epoch 0's permutation of range(num_items), then epoch 1's, ...;
  process p takes its elements origin + p, origin + p + P, origin + p + 2P, ...
  """
  j = np.arange(first, first + count, dtype=np.int64)
  global_index = int(origin) + process_index + j * process_count
  epochs, within = np.divmod(global_index, num_items)
  out = np.empty(count, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = _epoch_permutation(num_items, seed, source_index, int(epoch))[within[sel]]
  return out


def stream_seed(seed: int, source_index: int, process_index: int) -> int:
  """A 31-bit seed for (data seed, source, process): shuffles and crops differ across them."""
  return int(np.random.default_rng([seed, source_index, process_index]).integers(1, 2**31))


# ---------------------------------------------------------------------------------------------
# The table: advanced by the train step, read back by a restarted run.

def advance_position(table: jax.Array, positions: jax.Array) -> jax.Array:
  """The data-position table after a batch: pure, for the jitted train step.

  table: int32 [processes, sources, 2], for each (process, source) the (group, offset) of the
  next unread record. positions: int32 [batch, 4], the batch's `_position` rows (process,
  source, group, offset). Sources absent from the batch keep their entry.
  """
  num_p, num_s, _ = table.shape
  segment = positions[:, 0] * num_s + positions[:, 1]
  groups, offsets = positions[:, 2], positions[:, 3]
  n = num_p * num_s
  last_group = jax.ops.segment_max(groups, segment, num_segments=n)  # int32 min if absent
  in_last = groups == last_group[segment]
  last_offset = jax.ops.segment_max(jnp.where(in_last, offsets, -1), segment, num_segments=n)
  seen = (last_offset >= 0).reshape(num_p, num_s, 1)
  new = jnp.stack([last_group, last_offset + 1], axis=-1).reshape(num_p, num_s, 2)
  return jnp.where(seen, new.astype(table.dtype), table)


def this_process_position(position, start: int, num: int, process_index: int,
                          process_count: int) -> np.ndarray:
  """[sources, 2] where this process resumes; accepts the whole table or this process's row."""
  if position is None:
    if start:
      raise ValueError(
          f"resuming at example {start} of a file source needs the data position "
          "(train state data_position); without it the run would repeat data")
    return np.zeros((num, 2), np.int64)
  position = np.asarray(position, np.int64)
  if position.ndim == 3:
    if position.shape[0] != process_count:
      raise ValueError(f"the data position was saved by {position.shape[0]} processes; this run "
                       f"has {process_count}. Resume with the same number of processes, or map "
                       "it with resume_position (config.input.on_process_count_change).")
    position = position[process_index]
  if position.shape != (num, 2):
    raise ValueError(f"the data position has shape {position.shape}, expected ({num}, 2) for "
                     f"{num} source(s) in config.input.data: the data config changed")
  return position


# ---------------------------------------------------------------------------------------------
# Resuming with another number of processes.

def restart_at_first_unfinished(progress: Sequence[tuple[int, int]], origin, num_items: int,
                                new_count: int):
  """Where a run with `new_count` processes starts so that nothing is skipped, for a source
  with a global item sequence, when old process p had finished progress[p][0] items and
  started progress[p][1] (counted in its own item sequence) from `origin` (epoch, item).

  Returns (origin (epoch, item), rows int64 [new_count, 2], repeated): all new processes
  start at the first global item some old process had not finished; `repeated` counts the
  items from there on that an old process had already opened (read again, fully).
  """
  old = len(progress)
  base = int(origin[0]) * num_items + int(origin[1])
  restart = min(base + p + done * old for p, (done, _) in enumerate(progress))
  repeated = 0
  for p, (_, started) in enumerate(progress):
    first_after = max(0, -(-(restart - base - p) // old))  # p's first item at/after restart
    repeated += max(0, started - first_after)
  return (restart // num_items, restart % num_items), np.zeros((new_count, 2), np.int64), repeated


def restart_at_least_advanced_group(rows, origin, new_count: int):
  """The restart of a source split per process (TFDS: no global item order): every new
  process starts at the beginning of the least advanced old process's group, given the old
  rows int [old, 2] (group, offset). `repeated` counts the (process, group) passes an old
  process had begun from there on. Returns (origin, rows int64 [new_count, 2], repeated)."""
  rows = np.asarray(rows, np.int64).reshape(-1, 2)
  first = int(rows[:, 0].min())
  repeated = int(sum(g - first + (r > 0) for g, r in rows))
  return tuple(origin), np.tile([[first, 0]], (new_count, 1)).astype(np.int64), repeated


def resume_position(config, table, origin, process_count: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(table, origin) to resume with this run's process count from a saved data position.

  table: int [saved processes, sources, 2]; origin: int [sources, 2] (each source's global
  item origin, (epoch, item)). The same process count: both unchanged. Otherwise the demo
  data resumes exactly (it depends on examples_seen only); file sources follow
  config.input.on_process_count_change: 'error' (default) refuses, 'restart' starts every new
  process at the first item some old process had not finished (`Source.restart_positions`),
  which repeats what the old processes had read beyond it and skips nothing; it logs how many
  shards are read again. The returned origin makes later resumes with the new count exact.
  """
  n = jax.process_count() if process_count is None else process_count
  table = np.asarray(table, np.int64)
  origin = np.asarray(origin, np.int64)
  old = table.shape[0]
  if old == n:
    return table.astype(np.int32), origin.astype(np.int32)
  if spec.is_demo(config):
    return initial_position(config, n), origin.astype(np.int32)
  policy = spec.input_field(config, "on_process_count_change")
  if policy not in PROCESS_COUNT_POLICIES:
    raise ValueError(f"config.input.on_process_count_change={policy!r}: use one of "
                     f"{PROCESS_COUNT_POLICIES}")
  if policy == "error":
    raise ValueError(
        f"the data position was saved by {old} processes; this run has {n}. File sources "
        "cannot continue exactly with another process count (each process reads its own "
        f"shards). Resume with {old} processes, or set "
        "config.input.on_process_count_change='restart' to restart every source at the first "
        "shard some process had not finished (re-reads those shards, skips nothing; "
        "docs/data.md).")
  from superclip_jax.data import sources  # file sources need TensorFlow; the rest does not
  srcs = sources.build_sources(config)
  if table.shape[1:] != (len(srcs), 2) or origin.shape != (len(srcs), 2):
    raise ValueError(f"the data position has shape {table.shape} (origin {origin.shape}), "
                     f"expected ({old}, {len(srcs)}, 2) for {len(srcs)} source(s) in "
                     "config.input.data: the data config changed")
  new_table = np.zeros((n, len(srcs), 2), np.int64)
  new_origin = origin.copy()
  for i, src in enumerate(srcs):
    new_origin[i], new_table[:, i], repeated = src.restart_positions(
        table[:, i], origin[i], n, int(spec.input_field(config, "cycle_length")))
    logging.warning(
        "%s: data position saved by %d processes, resuming with %d "
        "(on_process_count_change='restart'): restarting at epoch %d, %s %d; %d %s(s) that "
        "old processes had started are read again, nothing is skipped.", src.spec, old, n,
        new_origin[i][0], src.item_name, new_origin[i][1], repeated, src.item_name)
  return new_table.astype(np.int32), new_origin.astype(np.int32)
