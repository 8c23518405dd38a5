"""tf.data input pipelines: sources -> per-process batches of numpy arrays -> global jax.Arrays.

How a batch flows (docs/data.md has the whole story):
  1. `config.input.data` names one source or a weighted mixture (`sources.py`: webdataset tar
     shards, img2dataset TFRecords, TFDS, an image folder, or the built-in demo). Each process
     reads its own shards, endlessly, from the data position stored in the train state.
  2. Per record, on the host CPU (TensorFlow never sees an accelerator): decode, pick a
     caption, RandomResizedCrop (`transforms.py`, pixel-equal to OpenCLIP). Bad records are
     skipped and counted (`data_metrics()`); a mixture then picks each example's source with
     seeded weights.
  3. Batches of this process's rows are tokenized with the CLIP BPE and CLIP-normalised.
  4. `to_global` assembles the per-process slices into global arrays laid out over the mesh;
     `prefetch_to_device` keeps the next batches in flight while a step runs.

A training batch is a dict: image float32 [b, H, W, 3] (CLIP-normalised), tokens int32
[b, context] (contrastive caption), class_tokens int32 [b, context] (the class head's caption:
the same, or with a long-caption field the long one — the paper's "dual" captions), and
_position int32 [b, 4]: (process, source, group, offset) of each example's record.

Resuming exactly. Every example carries where its record sits in its source's stream. The
train step folds a batch's `_position` into the state's data-position table int32
[processes, sources, 2] with `advance_position`; a restarted run passes the table (and
examples_seen) back to `train_dataset`, and each source continues right after the last
record consumed (no repeats, no skips: bad records were dropped before a position was
consumed, augmentation is seeded by position, and the mixture's choice for a process's n-th
example depends only on n = examples_seen / processes). A run with a different number of
processes maps the saved table with `resume_position` (config.input.on_process_count_change):
exact for the demo data, a documented re-reading restart for file sources (docs/data.md).
"""
from __future__ import annotations

import collections
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import logging

from superclip_jax import tokenizer
from superclip_jax.data import bad_records, demo, sources, transforms

# Keep TensorFlow on the host CPU: it must not grab accelerator memory.
tf.config.set_visible_devices([], "GPU")
tf.config.set_visible_devices([], "TPU") if tf.config.list_physical_devices("TPU") else None

CLIP_MEAN = transforms.CLIP_MEAN
CLIP_STD = transforms.CLIP_STD
normalize = transforms.normalize

# config.input fields this module reads, with the defaults used when a config lacks them.
DEFAULTS = dict(
    shuffle_buffer=5000,  # records per process and source shuffled together
    cycle_length=8,  # shards read at once per process and source (a position group)
    image_key="",  # '' = the source's default (wds: jpg/jpeg/png/webp; tfrecord: jpg)
    text_key="",  # '' = 'txt' for shards; TFDS needs one unless it has a label
    long_text_key="",  # dual captions: the class head's caption ('' = the same caption)
    label_key="",  # TFDS label feature; label-only sources caption with label_templates
    label_templates=sources.DEFAULT_TEMPLATES,
    crop_scale=transforms.TRAIN_SCALE,
    skip_missing_shards=False,
    tfds_data_dir="",
    seed=None,  # None: config.seed
    threads=0,  # tf.data private thread pool per pipeline; 0 = TensorFlow's default
    prefetch=2,  # batches
    # A resumed run with another number of processes than the one that saved the data
    # position: 'error', or 'restart' file sources where some process had not finished
    # (re-reads, never skips; resume_position, docs/data.md). The demo data resumes exactly.
    on_process_count_change="error",
)
PROCESS_COUNT_POLICIES = ("error", "restart")


def _input_field(config, name):
  value = config.input.get(name, None)
  return DEFAULTS[name] if value is None else value


def data_seed(config) -> int:
  seed = config.input.get("seed", None)
  return int(config.seed if seed is None else seed)


def local_batch_size(global_batch: int, process_count: int | None = None) -> int:
  n = jax.process_count() if process_count is None else process_count
  if global_batch % n:
    raise ValueError(f"input.batch_size={global_batch} is not divisible by the number of "
                     f"processes ({n}); choose a multiple of {n}")
  return global_batch // n


def mixture(data) -> list[tuple[str, float]]:
  """config.input.data -> [(spec, weight)].

  A spec string; several joined by ';', each with an optional `?weight=W` (default 1):
  'wds:/d/{00000..00999}.tar?weight=0.8; tfds:coco_captions:train?text=captions/text&weight=0.2'.
  A sequence of (spec, weight) pairs is accepted too.
  """
  if isinstance(data, str):
    pairs = [_weighted(entry, data) for entry in data.split(";")]
  else:
    try:
      pairs = [(str(spec), float(weight)) for spec, weight in data]
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.input.data={data!r}: use a spec string or ((spec, weight), ...)"
                       ) from e
  if not pairs or any(not w > 0 for _, w in pairs):
    raise ValueError(f"config.input.data={data!r}: a mixture needs positive weights")
  if len(pairs) > 1 and any(sources.parse_spec(spec)[0] == "demo" for spec, _ in pairs):
    raise ValueError("config.input.data: 'demo' cannot be part of a mixture")
  return pairs


def _weighted(entry: str, data: str) -> tuple[str, float]:
  """'spec?a=b&weight=W' -> ('spec?a=b', W)."""
  entry = entry.strip()
  if not entry:
    raise ValueError(f"config.input.data={data!r} has an empty entry (check the ';')")
  spec, _, query = entry.partition("?")
  weight, options = 1.0, []
  for item in filter(None, query.split("&")):
    key, _, value = item.partition("=")
    if key.strip() == "weight":
      try:
        weight = float(value)
      except ValueError:
        raise ValueError(f"config.input.data: {entry!r} has weight={value!r}, not a number"
                         ) from None
    else:
      options.append(item)
  return (spec + "?" + "&".join(options) if options else spec), weight


def num_sources(config) -> int:
  return len(mixture(config.input.data))


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


def resume_position(config, table, origin, process_count: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(table, origin) to resume with this run's process count from a saved data position.

  table: int [saved processes, sources, 2]; origin: int [sources, 2] (sources.Source's global
  item origin, (epoch, item)). The same process count: both unchanged. Otherwise the demo
  data resumes exactly (it depends on examples_seen only); file sources follow
  config.input.on_process_count_change: 'error' (default) refuses, 'restart' starts every new
  process at the first item some old process had not finished (`restart_positions`), which
  repeats what the old processes had read beyond it and skips nothing; it logs how many
  shards are read again. The returned origin makes later resumes with the new count exact.
  """
  n = jax.process_count() if process_count is None else process_count
  table = np.asarray(table, np.int64)
  origin = np.asarray(origin, np.int64)
  old = table.shape[0]
  if old == n:
    return table.astype(np.int32), origin.astype(np.int32)
  if sources.parse_spec(mixture(config.input.data)[0][0])[0] == "demo":
    return initial_position(config, n), origin.astype(np.int32)
  policy = _input_field(config, "on_process_count_change")
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
  srcs = build_sources(config)
  if table.shape[1:] != (len(srcs), 2) or origin.shape != (len(srcs), 2):
    raise ValueError(f"the data position has shape {table.shape} (origin {origin.shape}), "
                     f"expected ({old}, {len(srcs)}, 2) for {len(srcs)} source(s) in "
                     "config.input.data: the data config changed")
  new_table = np.zeros((n, len(srcs), 2), np.int64)
  new_origin = origin.copy()
  for i, src in enumerate(srcs):
    new_origin[i], new_table[:, i], repeated = src.restart_positions(
        table[:, i], origin[i], n, int(_input_field(config, "cycle_length")))
    logging.warning(
        "%s: data position saved by %d processes, resuming with %d "
        "(on_process_count_change='restart'): restarting at epoch %d, %s %d; %d %s(s) that "
        "old processes had started are read again, nothing is skipped.", src.spec, old, n,
        new_origin[i][0], src.item_name, new_origin[i][1], repeated, src.item_name)
  return new_table.astype(np.int32), new_origin.astype(np.int32)


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


def _this_process_position(position, start: int, num: int, process_index: int,
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


def build_sources(config) -> list[sources.Source]:
  """The sources of config.input.data, checked now (paths, fields), in mixture order."""
  fields = sources.Fields(
      image=_input_field(config, "image_key"), text=_input_field(config, "text_key"),
      long_text=_input_field(config, "long_text_key"), label=_input_field(config, "label_key"),
      label_templates=tuple(_input_field(config, "label_templates")))
  return [sources.from_spec(spec, fields,
                            skip_missing_shards=bool(_input_field(config, "skip_missing_shards")),
                            data_dir=_input_field(config, "tfds_data_dir") or None)
          for spec, _ in mixture(config.input.data)]


def _train_micro_batch(records, groups, offsets, *, seed: int, size: int, scale):
  """tf.numpy_function body: packed records [m] -> images uint8 [m, size, size, 3], caption,
  long caption and key [m], status int32 [m] (transforms.OK or BAD)."""
  m = len(records)
  images = np.zeros((m, size, size, 3), np.uint8)
  captions, long_captions, keys = (np.full(m, b"", dtype=object) for _ in range(3))
  status = np.full(m, transforms.BAD, np.int32)
  uniforms = transforms.position_uniforms(seed, groups, offsets)
  for i, data in enumerate(records):
    record = sources.unpack(data)
    keys[i] = record.key
    if record.problem:
      bad_records.count(record.problem)
      continue
    images[i], captions[i], long_captions[i], status[i] = transforms.train_record(
        record.image, record.texts, record.long_texts, uniforms[i], size, scale)
  return images, captions, long_captions, keys, status


def _train_examples(config, source: sources.Source, source_index: int, position, origin,
                    process_index: int, process_count: int, with_keys: bool) -> tf.data.Dataset:
  """One source's good examples for this process: image uint8, captions, _position."""
  size = config.model.image_size
  seed = data_seed(config)
  body = functools.partial(
      _train_micro_batch, seed=sources.stream_seed(seed, source_index, process_index),
      size=size, scale=tuple(float(s) for s in _input_field(config, "crop_scale")))
  micro_batches = source.train_records(
      seed=seed, source_index=source_index, group=int(position[0]), offset=int(position[1]),
      process_index=process_index, process_count=process_count,
      cycle_length=int(_input_field(config, "cycle_length")),
      shuffle_buffer=int(_input_field(config, "shuffle_buffer")),
      origin=(int(origin[0]), int(origin[1])))

  def process(mb):
    image, caption, long_caption, key, status = tf.numpy_function(
        body, [mb["record"], mb["group"], mb["offset"]],
        [tf.uint8, tf.string, tf.string, tf.string, tf.int32], stateful=False)
    m = tf.shape(mb["record"])[0]
    out = {"image": tf.ensure_shape(image, [None, size, size, 3]),
           "caption": tf.reshape(caption, [m]), "long_caption": tf.reshape(long_caption, [m]),
           "_status": tf.reshape(status, [m]),
           "_position": tf.cast(tf.stack([tf.fill([m], tf.cast(process_index, tf.int64)),
                                          tf.fill([m], tf.cast(source_index, tf.int64)),
                                          mb["group"], mb["offset"]], axis=1), tf.int32)}
    if with_keys:
      out["_key"] = tf.reshape(key, [m])
    return out

  examples = micro_batches.map(process, num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True).unbatch()
  examples = examples.filter(lambda ex: ex["_status"] == transforms.OK)
  return examples.map(lambda ex: {k: v for k, v in ex.items() if k != "_status"})


def _mixed(streams: Sequence[tf.data.Dataset], weights: Sequence[float], seed: int,
           first_example: int, process_index: int) -> tf.data.Dataset:
  """Example n of this process comes from a source drawn with `weights`, seeded by n."""
  if len(streams) == 1:
    return streams[0]
  logits = tf.math.log(tf.constant([list(weights)], tf.float32) / sum(weights))
  key0 = sources.stream_seed(seed, 1 << 20, process_index)

  def choose(n):
    draw = tf.random.stateless_categorical(logits, 1, seed=tf.stack([tf.constant(key0, tf.int64),
                                                                    n]))
    return tf.reshape(draw, [])

  choices = tf.data.Dataset.range(first_example, np.iinfo(np.int64).max).map(choose)
  return tf.data.Dataset.choose_from_datasets(list(streams), choices)


def _finish_batch(config, dual: bool):
  ctx = config.model.context_length

  def finish(batch):
    out = {"image": normalize(batch["image"]),
           "tokens": tokenizer.tf_tokenize(batch["caption"], ctx)}
    out["class_tokens"] = (tokenizer.tf_tokenize(batch["long_caption"], ctx) if dual
                           else out["tokens"])
    out["_position"] = batch["_position"]
    if "_key" in batch:
      out["_key"] = batch["_key"]
    return out
  return finish


def train_dataset(config, start: int = 0, position=None, *, origin=None,
                  process_index: int | None = None, process_count: int | None = None,
                  with_keys: bool = False) -> tf.data.Dataset:
  """This process's slices of the global training batches.

  start: global examples consumed so far (train state examples_seen). position: the train
  state's data-position table [processes, sources, 2] (or this process's row [sources, 2]);
  required to resume a file source (start > 0). origin: the train state's data_origin
  [sources, 2] (None: every source from its start). process_index / process_count default to
  JAX's (tests pass them to act as one host of many). with_keys adds '_key' (string [b]: each
  example's record key) for inspection; a train step cannot take strings.
  """
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  local = local_batch_size(config.input.batch_size, n)
  pairs = mixture(config.input.data)
  if sources.parse_spec(pairs[0][0])[0] == "demo":
    return _demo_train_dataset(config, start, p, n)
  srcs = build_sources(config)
  resume = _this_process_position(position, start, len(srcs), p, n)
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
  return _with_options(ds.prefetch(int(_input_field(config, "prefetch"))), config)


def eval_dataset(source: sources.Source, image_size: int, batch_size: int, *,
                 process_index: int | None = None, process_count: int | None = None,
                 max_captions: int | None = None) -> tf.data.Dataset:
  """A source's records once, in order, with the eval transform (OpenCLIP's: shortest side
  resize + center crop, CLIP-normalised); the last batch may be smaller (callers pad).

  Batches: image float32 [b, S, S, 3], label int64 [b] (-1: none), captions string [b, n]
  (every caption of the record, padded with b''; cut to max_captions), key string [b].
  Records without a usable image are skipped and counted (data_metrics()).
  """
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count

  def body(records):
    m = len(records)
    images = np.zeros((m, image_size, image_size, 3), np.uint8)
    status = np.full(m, transforms.BAD, np.int32)
    labels = np.full(m, -1, np.int64)
    keys = np.full(m, b"", dtype=object)
    captions, counts = [], np.zeros(m, np.int64)
    for i, data in enumerate(records):
      record = sources.unpack(data)
      labels[i], keys[i], counts[i] = record.label, record.key, len(record.texts)
      captions += record.texts
      if record.problem in ("missing_image", "malformed_record"):  # no usable image
        bad_records.count(record.problem)
        continue
      images[i], status[i] = transforms.eval_record(record.image, image_size)
    return images, status, labels, keys, np.array(captions, dtype=object).reshape(-1), counts

  def process(records):
    image, status, label, key, captions, counts = tf.numpy_function(
        body, [records], [tf.uint8, tf.int32, tf.int64, tf.string, tf.string, tf.int64],
        stateful=False)
    m = tf.shape(records)[0]
    captions = tf.RaggedTensor.from_row_lengths(tf.reshape(captions, [-1]),
                                                tf.reshape(counts, [m]))
    if max_captions is not None:
      captions = captions[:, :max_captions]
    return {"image": tf.ensure_shape(image, [None, image_size, image_size, 3]),
            "label": tf.reshape(label, [m]), "captions": captions, "key": tf.reshape(key, [m]),
            "_status": tf.reshape(status, [m])}

  ds = source.eval_records(p, n).batch(sources.MICRO_BATCH).map(
      process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
  ds = ds.filter(lambda ex: ex["_status"] == transforms.OK)
  ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k != "_status"})
  ds = ds.padded_batch(batch_size, padded_shapes={"image": [image_size, image_size, 3],
                                                  "label": [], "captions": [None], "key": []},
                       padding_values={"image": tf.constant(0, tf.uint8),
                                       "label": tf.constant(-1, tf.int64),
                                       "captions": b"", "key": b""})
  ds = ds.map(lambda b: {**b, "image": normalize(b["image"])},
              num_parallel_calls=tf.data.AUTOTUNE)
  return _with_options(ds.prefetch(2))


def data_metrics(all_reasons: bool = False) -> dict[str, float]:
  """This process's skipped-record counts since it started, for the training log:
  {'data/skipped': total, 'data/skipped_<reason>': count, ...} — only the reasons seen so far
  (a clean dataset adds one short field to the log line), or every reason."""
  counts = bad_records.counts()
  out = {"data/skipped": float(sum(counts.values()))}
  out.update({f"data/skipped_{reason}": float(n) for reason, n in counts.items()
              if n or all_reasons})
  return out


def global_data_metrics() -> dict[str, float]:
  """`data_metrics` summed over all processes. A collective: every process must call it at
  the same point (e.g. each log step)."""
  if jax.process_count() == 1:
    return data_metrics()
  from jax.experimental import multihost_utils
  local = data_metrics(all_reasons=True)
  values = np.asarray(list(local.values()), np.float64)
  total = np.asarray(multihost_utils.process_allgather(values)).reshape(-1, len(values)).sum(0)
  return {k: v for k, v in zip(local, total.tolist()) if v or k == "data/skipped"}


# ---------------------------------------------------------------------------------------------
# The built-in demo data: example i of the stream is rendered directly, so `start` resumes it.

def _demo_rows(global_batch: int, start: int, process_index: int,
               process_count: int) -> tf.data.Dataset:
  """Global example indices of this process's rows, batch after batch, from `start` on."""
  local = local_batch_size(global_batch, process_count)
  first = start + process_index * local
  # Batch k holds global rows [start + k*B, start + (k+1)*B); this process takes its slice.
  return tf.data.Dataset.range(first, np.iinfo(np.int64).max, global_batch).map(
      lambda i: tf.range(i, i + local))


def _demo_render(config, split: str, indices):
  image_size = config.model.image_size
  seed = config.input.demo.seed

  def render(idx):
    b = demo.batch(seed, split, idx, image_size)
    return (b["image"], b["caption"], b["long_caption"], b["colour"], b["shape"],
            b["position"])

  out = tf.numpy_function(render, [indices],
                          [tf.uint8, tf.string, tf.string, tf.int32, tf.int32, tf.int32],
                          stateful=False)
  n = tf.shape(indices)[0]
  image, caption, long_caption, colour, shape, position = out
  image.set_shape([None, image_size, image_size, 3])
  return {"image": image, "caption": tf.reshape(caption, [n]),
          "long_caption": tf.reshape(long_caption, [n]), "colour": colour, "shape": shape,
          "position": position}


def _demo_train_dataset(config, start: int, process_index: int,
                        process_count: int) -> tf.data.Dataset:
  dual = bool(config.input.demo.long_captions_for_head)
  ds = _demo_rows(config.input.batch_size, start, process_index, process_count)
  ds = ds.map(lambda idx: {**_demo_render(config, "train", idx),
                           # The demo resumes from examples_seen; its position rows are unused.
                           "_position": tf.tile([[process_index, 0, 0, 0]],
                                                [tf.shape(idx)[0], 1])},
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(_finish_batch(config, dual), num_parallel_calls=tf.data.AUTOTUNE)
  return _with_options(ds.prefetch(2), config)


def _with_options(ds: tf.data.Dataset, config=None) -> tf.data.Dataset:
  opts = tf.data.Options()
  opts.deterministic = True  # the data position relies on a reproducible order
  opts.experimental_optimization.map_parallelization = True
  threads = int(_input_field(config, "threads")) if config is not None else 0
  if threads > 0:
    opts.threading.private_threadpool_size = threads
  return ds.with_options(opts)


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Per-process numpy slices -> global jax.Arrays sharded over the mesh's batch axes."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch_to_device(iterator: Iterator[dict], sharding, size: int = 2) -> Iterator[dict]:
  """Keeps `size` batches already handed to the devices: transfers are asynchronous, so the
  next batches travel while the current step runs."""
  queue: collections.deque = collections.deque()
  for batch in iterator:
    queue.append(to_global(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()

