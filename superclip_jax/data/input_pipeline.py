"""tf.data input pipelines: sources -> per-process batches of numpy arrays -> global jax.Arrays.

How a batch flows (docs/data.md has the whole story):
  1. `config.input.data` names one source or a weighted mixture (`spec.py`; `sources.py` builds
     them: webdataset tar shards, img2dataset TFRecords, TFDS, an image folder, or the built-in
     demo). Each process reads its own shards, endlessly, from the data position stored in the
     train state (`position.py`).
  2. Per record, on the host CPU (TensorFlow never sees an accelerator): decode, pick a
     caption, RandomResizedCrop (`transforms.py`, pixel-equal to OpenCLIP). Bad records are
     skipped, and counted onto the next good example (`_skipped`); a mixture then picks each
     example's source with seeded weights.
  3. Batches of this process's rows are tokenized with the CLIP BPE and CLIP-normalised.
  4. `to_global` assembles the per-process slices into global arrays laid out over the mesh;
     `prefetch_to_device` keeps the next batches in flight while a step runs.

A training batch is a dict: image float32 [b, H, W, 3] (CLIP-normalised), tokens int32
[b, context] (contrastive caption), class_tokens int32 [b, context] (the class head's caption:
the same, or with a long-caption field the long one — the paper's "dual" captions), and
_position int32 [b, 4]: (process, source, group, offset) of each example's record, which the
train step folds into the data-position table (`position.advance_position`) so that a
restarted run continues exactly; file sources add _skipped int32 [b, len(bad_records.REASONS)]
(the records skipped just before each example) and _epoch int32 [b] (its pass over its source),
which the train step sums into the logged counts (`bad_records.DataCounts`).
"""
from __future__ import annotations

import atexit
import collections
import functools
import gc
import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from superclip_jax import models, tokenizer
from superclip_jax.data import bad_records, core, demo, sources, spec, transforms
from superclip_jax.data.position import (data_seed, local_batch_size, stream_seed,
                                         this_process_position)
from superclip_jax.data.records import unpack

# Keep TensorFlow on the host CPU: it must not grab accelerator memory.
tf.config.set_visible_devices([], "GPU")
tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None


def _release_iterators_at_exit() -> None:
  """Frees every live tf.data iterator before the interpreter tears down.

  Our pipelines call Python (tf.numpy_function) from TensorFlow's threads. An iterator still
  alive at exit (a script's `it = iter(ds)` without `del it`) is freed during finalization,
  when a thread entering Python to finish its call is ended instead, and the iterator's
  destructor waits for that call forever (about 2 in 5 script runs hung). Freed here, in an
  atexit hook, those calls can still finish. Iterators are unusable afterwards.
  """
  for obj in gc.get_objects():
    if issubclass(type(obj), tf.data.Iterator):
      getattr(obj, "__dict__", {}).pop("_iterator_resource", None)  # the last reference


atexit.register(_release_iterators_at_exit)


def _train_micro_batch(records, groups, offsets, *, seed: int, size: int, scale,
                       record_epochs: Callable):
  """tf.numpy_function body: packed records [m] -> images uint8 [m, size, size, 3], caption,
  long caption and key [m], status int32 [m] (transforms.OK, or a bad record's
  bad_records.code), epoch int32 [m] (`core.Source.record_epochs`)."""
  m = len(records)
  images = np.zeros((m, size, size, 3), np.uint8)
  captions, long_captions, keys = (np.full(m, b"", dtype=object) for _ in range(3))
  status = np.full(m, transforms.OK, np.int32)
  uniforms = transforms.position_uniforms(seed, groups, offsets)
  for i, data in enumerate(records):
    record = unpack(data)
    keys[i] = record.key
    if record.problem:
      status[i] = bad_records.code(record.problem)
      continue
    images[i], captions[i], long_captions[i], status[i] = transforms.train_record(
        record.image, record.texts, record.long_texts, uniforms[i], size, scale)
  epochs = np.asarray(record_epochs(groups, offsets), np.int32).reshape(m)
  return images, captions, long_captions, keys, status, epochs


def _train_examples(config, source: core.Source, source_index: int, position, origin,
                    process_index: int, process_count: int, with_keys: bool) -> tf.data.Dataset:
  """One source's good examples for this process: image uint8, captions, _position, and
  _skipped int32 [len(REASONS)] / _epoch int32 (`_count_skips`)."""
  size = config.model.image_size
  seed = data_seed(config)
  cycle_length = int(spec.input_field(config, "cycle_length"))
  origin = (int(origin[0]), int(origin[1]))
  body = functools.partial(
      _train_micro_batch, seed=stream_seed(seed, source_index, process_index),
      size=size, scale=tuple(float(s) for s in spec.input_field(config, "crop_scale")),
      record_epochs=functools.partial(source.record_epochs, process_index=process_index,
                                     process_count=process_count, cycle_length=cycle_length,
                                     origin=origin))
  micro_batches = source.train_records(
      seed=seed, source_index=source_index, group=int(position[0]), offset=int(position[1]),
      process_index=process_index, process_count=process_count, cycle_length=cycle_length,
      shuffle_buffer=int(spec.input_field(config, "shuffle_buffer")), origin=origin)

  def process(mb):
    image, caption, long_caption, key, status, epoch = tf.numpy_function(
        body, [mb["record"], mb["group"], mb["offset"]],
        [tf.uint8, tf.string, tf.string, tf.string, tf.int32, tf.int32], stateful=False)
    m = tf.shape(mb["record"])[0]
    out = {"image": tf.ensure_shape(image, [None, size, size, 3]),
           "caption": tf.reshape(caption, [m]), "long_caption": tf.reshape(long_caption, [m]),
           "_status": tf.reshape(status, [m]), "_epoch": tf.reshape(epoch, [m]),
           "_position": tf.cast(tf.stack([tf.fill([m], tf.cast(process_index, tf.int64)),
                                          tf.fill([m], tf.cast(source_index, tf.int64)),
                                          mb["group"], mb["offset"]], axis=1), tf.int32)}
    if with_keys:
      out["_key"] = tf.reshape(key, [m])
    return out

  examples = micro_batches.map(process, num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True)
  examples = _count_skips(examples, source.spec,
                          int(spec.input_field(config, "max_consecutive_skips"))).unbatch()
  examples = examples.filter(lambda ex: ex["_status"] == transforms.OK)
  return examples.map(lambda ex: {k: v for k, v in ex.items() if k != "_status"})


def _count_skips(micro_batches: tf.data.Dataset, source_spec: str,
                 limit: int) -> tf.data.Dataset:
  """Adds `_skipped` int32 [m, len(REASONS)] to the micro-batches: on each good record, the
  skipped records (by reason) since the previous good one of the stream, so the counts travel
  with what is consumed (nothing read ahead, each record once, exact on resume: records after
  the last consumed good one are read again).

  Ends the (endless) stream once `limit` records in a row were skipped, leaving a
  bad_records.TooManySkipped for its reader (`host_batches`) to raise: an error raised inside
  tf.data would come wrapped, its traceback logged by TensorFlow. Counted in stream order, so
  whether and where it stops is deterministic. 0: no limit."""
  num_reasons = len(bad_records.REASONS)

  def count(run, mb):  # run int64 [reasons]: records skipped since the last good one
    status = mb["_status"]
    good = status == transforms.OK
    m = tf.shape(status)[0]
    by_reason = tf.one_hot(status - 1, num_reasons, dtype=tf.int64)  # a good record: zeros
    # Segment k: the records after the k-th good one up to the (k+1)-th (which ends it).
    segment = tf.cumsum(tf.cast(good, tf.int32), exclusive=True)
    per_segment = tf.math.unsorted_segment_sum(by_reason, segment, m + 1)
    per_segment += tf.pad(run[None], [[0, m], [0, 0]])  # the run so far ends in segment 0
    skipped = tf.where(good[:, None], tf.gather(per_segment, segment), 0)
    run = per_segment[tf.reduce_sum(tf.cast(good, tf.int32))]
    return run, (run, {**mb, "_skipped": tf.cast(skipped, tf.int32)})

  def give_up(run):
    bad_records.too_many_skipped(source_spec, dict(zip(bad_records.REASONS, run.tolist())),
                                 limit)
    return False

  def go_on(run, mb):
    del mb
    if limit <= 0:
      return tf.constant(True)
    return tf.cond(tf.reduce_sum(run) < limit, lambda: tf.constant(True),
                   lambda: tf.reshape(tf.numpy_function(give_up, [run], tf.bool), []))
  counted = micro_batches.scan(tf.zeros([num_reasons], tf.int64), count)
  if limit > 0:
    counted = counted.take_while(go_on)
  return counted.map(lambda run, mb: mb)


def _mixed(streams: Sequence[tf.data.Dataset], weights: Sequence[float], seed: int,
           first_example: int, process_index: int) -> tf.data.Dataset:
  """Example n of this process comes from a source drawn with `weights`, seeded by n."""
  if len(streams) == 1:
    return streams[0]
  logits = tf.math.log(tf.constant([list(weights)], tf.float32) / sum(weights))
  key0 = stream_seed(seed, 1 << 20, process_index)

  def choose(n):
    draw = tf.random.stateless_categorical(logits, 1, seed=tf.stack([tf.constant(key0, tf.int64),
                                                                    n]))
    return tf.reshape(draw, [])

  choices = tf.data.Dataset.range(first_example, np.iinfo(np.int64).max).map(choose)
  return tf.data.Dataset.choose_from_datasets(list(streams), choices)


def _finish_batch(config, dual: bool):
  ctx = config.model.context_length

  def finish(batch):
    out = {"image": transforms.normalize(batch["image"]),
           "tokens": tokenizer.tf_tokenize(batch["caption"], ctx)}
    out["class_tokens"] = (tokenizer.tf_tokenize(batch["long_caption"], ctx) if dual
                           else out["tokens"])
    for key in ("_position", "_skipped", "_epoch", "_key"):
      if key in batch:
        out[key] = batch[key]
    return out
  return finish


def train_dataset(config, start: int = 0, position=None, *, origin=None,
                  process_index: int | None = None, process_count: int | None = None,
                  with_keys: bool = False, report: Callable[[str], None] | None = None
                  ) -> tf.data.Dataset:
  """This process's slices of the global training batches.

  start: global examples consumed so far (train state examples_seen). position: the train
  state's data-position table [processes, sources, 2] (or this process's row [sources, 2]);
  required to resume a file source (start > 0). origin: the train state's data_origin
  [sources, 2] (None: every source from its start). process_index / process_count default to
  JAX's (tests pass them to act as one host of many). with_keys adds '_key' (string [b]: each
  example's record key) for inspection; a train step cannot take strings. report: called with
  one line per source ('data: SPEC: N shards'), once they are checked.
  """
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  local = local_batch_size(config.input.batch_size, n)
  if spec.is_demo(config):
    if report is not None:
      report("data: demo")
    ds = demo.train_rows(config, start, p, n)
    ds = ds.map(_finish_batch(config, bool(config.input.demo.long_captions_for_head)),
                num_parallel_calls=tf.data.AUTOTUNE)
    return _with_options(ds.prefetch(2), config)
  pairs = spec.mixture(config.input.data)
  srcs = sources.build_sources(config)
  for src, (_, weight) in zip(srcs if report is not None else (), pairs):
    report(f"data: {src.summary()}" + (f" (weight {weight:g})" if len(srcs) > 1 else ""))
  warnings = [src.head_warning() for src in srcs]
  if report is not None and models.has_head(config.model.mode) and all(warnings):
    for line in warnings:  # a source with real captions teaches the head whatever the others do
      report(f"Warning: {line}")
  resume = this_process_position(position, start, len(srcs), p, n)
  origin = np.zeros((len(srcs), 2), np.int64) if origin is None else np.asarray(origin)
  if origin.shape != (len(srcs), 2):
    raise ValueError(f"the data origin has shape {origin.shape}, expected ({len(srcs)}, 2) for "
                     f"{len(srcs)} source(s) in config.input.data: the data config changed")
  streams = [_train_examples(config, src, i, resume[i], origin[i], p, n, with_keys)
             for i, src in enumerate(srcs)]
  ds = _mixed(streams, [w for _, w in pairs], data_seed(config), start // n, p)
  ds = ds.batch(local, drop_remainder=True)
  dual = any(src.has_long_text for src in srcs)
  ds = ds.map(_finish_batch(config, dual), num_parallel_calls=tf.data.AUTOTUNE)
  return _with_options(ds.prefetch(int(spec.input_field(config, "prefetch"))), config)


def _with_options(ds: tf.data.Dataset, config=None) -> tf.data.Dataset:
  opts = tf.data.Options()
  opts.deterministic = True  # the data position relies on a reproducible order
  opts.experimental_optimization.map_parallelization = True
  threads = int(spec.input_field(config, "threads")) if config is not None else 0
  if threads > 0:
    opts.threading.private_threadpool_size = threads
  return ds.with_options(opts)


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Per-process numpy slices -> global jax.Arrays sharded over the mesh's batch axes."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class InputStopped(Exception):
  """`host_batches` stopped waiting for a batch because its `stop()` became true."""


_END = object()
_CLOSE_SECONDS = 60  # how long exit waits for closed readers to free their iterators
# Readers whose generator was closed and that are freeing their tf.data iterator. Freeing one
# waits for tf.data's autotuning thread, 2-26 s after a run of a few minutes (half the demo
# runs measured, none with autotuning off), so closing does not wait for it: the next run in
# the process (the study's) starts at once, and exit waits (`_join_closing_readers`).
_CLOSING: set[threading.Thread] = set()


def _join_closing_readers() -> None:
  """At exit, before the interpreter tears down: lets closed readers finish freeing their
  iterators (tf.data torn down during finalization can deadlock), up to _CLOSE_SECONDS."""
  deadline = time.monotonic() + _CLOSE_SECONDS
  for reader in list(_CLOSING):
    reader.join(max(0.0, deadline - time.monotonic()))


atexit.register(_join_closing_readers)


def host_batches(iterator: Iterator[dict], size: int = 2, stop: Callable[[], bool] | None = None,
                 poll_seconds: float = 0.1, stall_seconds: float = 0.0) -> Iterator[dict]:
  """The batches of `iterator`, read `size` ahead in a daemon thread.

  The caller waits in Python, where signal handlers run: inside tf.data's C++ `next` they run
  only once a batch comes, which for input that never comes is never. While waiting, a true
  `stop()` raises InputStopped. A training stream that ended raises why (a
  bad_records.TooManySkipped). The thread lets go of the iterator when it stops reading (the
  generator closed: after the batch being read); closing does not wait for that, exit does
  (`_join_closing_readers`) unless a read is stalled: tf.data torn down at interpreter exit
  can deadlock. stall_seconds > 0: a wait that long for one batch logs a warning (`_stalled`),
  and again each time it lasts as long once more.
  """
  holder = [iterator]
  del iterator  # only the reader holds it
  ready: queue.Queue = queue.Queue(maxsize=size)
  closed = threading.Event()

  def hand_over(item) -> bool:  # False once the generator is closed
    while not closed.is_set():
      try:
        ready.put(item, timeout=poll_seconds)
        return True
      except queue.Full:
        pass
    return False

  def read():
    it = holder.pop()
    try:
      for batch in it:
        if not hand_over(batch):
          return
      hand_over(_END)
    except Exception as e:  # noqa: BLE001  handed to the consumer
      hand_over(e)
    finally:
      del it  # here, not at exit (a traceback keeps this frame, not the iterator)

  reader = threading.Thread(target=read, name="host_batches", daemon=True)
  reader.start()
  reader_done = False
  batches, waiting_since, warned = 0, time.monotonic(), 0
  try:
    while True:
      try:
        item = ready.get(timeout=poll_seconds)
      except queue.Empty:
        if stop is not None and stop():
          raise InputStopped("stopped while waiting for input") from None
        waited = time.monotonic() - waiting_since
        if stall_seconds > 0 and waited >= (warned + 1) * stall_seconds:
          warned += 1
          logging.warning("%s", _stalled(waited, batches, stall_seconds))
        continue
      batches, waiting_since, warned = batches + 1, time.monotonic(), 0
      if item is _END or isinstance(item, Exception):
        reader_done = True
        failure = bad_records.take_failure()
        if failure is not None:
          raise failure
        if item is _END:
          return
        raise item
      try:
        yield item
      except GeneratorExit:  # closed by the consumer: the reader stops after its batch
        reader_done = True
        raise
  finally:
    closed.set()
    if reader_done:
      _CLOSING.difference_update([t for t in _CLOSING if not t.is_alive()])
      _CLOSING.add(reader)


def _stalled(waited: float, batches: int, stall_seconds: float) -> str:
  """The stall warning: how long, which batch, and the shard reads that made no progress."""
  reads = sources.shards.stalled_reads(min(stall_seconds, waited) / 2)
  where = ("; shards giving no record: " + "; ".join(
      f"{spec}: {path} ({seconds:.0f} s)" for spec, path, seconds in reads[:5])
           + (f" and {len(reads) - 5} more" if len(reads) > 5 else "")) if reads else (
               "; no shard read of this process is stuck (the wait is in tf.data, a tfds "
               "source, or another process of the job)")
  return (f"Input stalled: no batch for {waited:.0f} s (waiting for batch {batches + 1} of this "
          f"process since the last one){where}. A stuck file (a FIFO, a hung network mount) "
          "blocks the shards read beside it: fix or remove it. SIGTERM or Ctrl-C stops the run "
          "with a checkpoint of its last step (config.input.stall_warning_seconds sets this "
          "warning's interval).")


def prefetch_to_device(iterator: Iterator[dict], sharding, size: int = 2,
                       stop: Callable[[], bool] | None = None,
                       stall_seconds: float = 0.0) -> Iterator[dict]:
  """Keeps `size` batches already handed to the devices: transfers are asynchronous, so the
  next batches travel while the current step runs. Host batches come from `host_batches`
  (`stop`, `stall_seconds`: see there)."""
  pending: collections.deque = collections.deque()
  # One more host batch in memory is enough to wait on.
  host = host_batches(iterator, 1, stop, stall_seconds=stall_seconds)
  del iterator  # the reader thread's alone
  try:
    for batch in host:
      pending.append(to_global(batch, sharding))
      if len(pending) > size:
        yield pending.popleft()
    while pending:
      yield pending.popleft()
  finally:
    host.close()

