"""The data-source API: a `Source` is checked when built, then read endlessly and positioned for
training (`train_records`) or once, in order, for evaluation (`eval_records`).

One file per kind implements it: `shards.py` (webdataset tar, TFRecord), `tfds_source.py`,
`image_folder.py`; `sources.py` builds the right one from a spec string. Every source yields
packed records (`records.py`); training streams come in micro-batches of up to MICRO_BATCH
records of one position group: {'record': string [m], 'group': int64 [m], 'offset': int64 [m]}
(`position.py` explains groups, offsets and origins).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from superclip_jax.data import position
from superclip_jax.data.spec import Fields

MICRO_BATCH = 16  # records per Python call when decoding
INT64_MAX = np.iinfo(np.int64).max


class Source:
  """A data source: checked when built; `train_records` and `eval_records` read it."""
  kind = ""
  classnames: tuple[str, ...] | None = None

  def __init__(self, spec: str, fields: Fields):
    self.spec = spec
    self.fields = fields

  @property
  def has_long_text(self) -> bool:
    return bool(self.fields.long_text)

  def train_records(self, *, seed: int, source_index: int, group: int, offset: int,
                    process_index: int, process_count: int, cycle_length: int,
                    shuffle_buffer: int, origin=(0, 0)) -> tf.data.Dataset:
    """This process's endless record stream from position (group, offset) on, in
    micro-batches (see the module docstring); groups count from the global item `origin`
    (epoch, item). Deterministic for the same arguments."""
    raise NotImplementedError

  # Sources with a global item sequence (shards, folder files) define these two.
  num_items = 0
  item_name = "item"

  def _progress(self, group: int, offset: int, process_count: int,
                cycle_length: int) -> tuple[int, int]:
    """(items finished, items started) of a process at (group, offset), counted in its own
    item sequence: items before the first are done, those up to the second were opened."""
    raise NotImplementedError

  def _items_per_group(self, process_count: int, cycle_length: int) -> int:
    raise NotImplementedError

  def record_epochs(self, groups, offsets, process_index: int, process_count: int,
                    cycle_length: int, origin=(0, 0)) -> np.ndarray:
    """The epoch (0: the first pass over the data) of each record of this process at position
    (`groups`, `offsets`) int [n]. Here that of its group's first item (a shard group that
    straddles two epochs counts in the first); sources that know each record's item say so."""
    del offsets
    k = self._items_per_group(process_count, cycle_length)
    first = int(origin[0]) * self.num_items + int(origin[1]) + process_index
    return (first + np.asarray(groups, np.int64) * k * process_count) // self.num_items

  def restart_positions(self, rows, origin, new_count: int, cycle_length: int):
    """Where the processes of a run with `new_count` processes start so that nothing the old
    run had not consumed is skipped, when `len(rows)` processes stood at `rows` int [old, 2]
    (group, offset) counted from `origin` (epoch, item).

    Returns (origin (epoch, item), rows int64 [new_count, 2], repeated):
    `position.restart_at_first_unfinished`.
    """
    rows = np.asarray(rows, np.int64).reshape(-1, 2)
    progress = [self._progress(int(g), int(r), len(rows), cycle_length) for g, r in rows]
    return position.restart_at_first_unfinished(progress, origin, self.num_items, new_count)

  def head_warning(self) -> str | None:
    """Why this source's captions cannot teach the class head anything, if they cannot."""
    return None

  def summary(self) -> str:
    """One line for the start-up facts: the spec and how much it holds."""
    if not self.num_items:
      return self.spec
    return f"{self.spec}: {self.num_items} {self.item_name}{'s' if self.num_items > 1 else ''}"

  def eval_records(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """This process's part of the records (packed strings), once, in a fixed order."""
    raise NotImplementedError

  def __repr__(self):
    return f"{type(self).__name__}({self.spec!r})"


def positioned(items: tf.data.Dataset, group, first_group: int, first_offset: int,
               to_record: Callable | None = None) -> tf.data.Dataset:
  """A group's items -> micro-batches of records with their positions, from first_offset on
  in the first group. `to_record` (item -> packed record) runs after the skip, so a restart
  does not read or pack what it skips."""
  items = items.enumerate().skip(
      tf.where(group == first_group, tf.constant(first_offset, tf.int64), 0))
  if to_record is not None:
    items = items.map(lambda offset, item: (offset, to_record(item)),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return items.batch(MICRO_BATCH).map(
      lambda offset, record: {"record": record, "group": tf.fill(tf.shape(offset), group),
                              "offset": offset})
