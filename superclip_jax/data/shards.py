"""Sharded sources: webdataset tar shards and img2dataset TFRecords, local or gs://.

A shard pattern expands braces and globs (`list_files`); every named shard must exist. Shards
are read record by record in Python (`webdataset.read_shard`, a TFRecord iterator); what is
wrong with a record becomes its `problem` (bad_records), never an exception, and a shard that
cannot be read on ends with one placeholder record saying why (training only). A process reads
its shards in groups of `cycle_length`, interleaved and shuffled (`position.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from superclip_jax.data import core, position, records, webdataset
from superclip_jax.data.spec import Fields, expand_braces

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Shards being read in this process: (source spec, path, reader) -> when a record last came
# (or the shard was opened), None while the reader waits for its consumer, not for the
# shard; for the stall report (`stalled_reads`).
_READING: dict[tuple[str, str, int], float | None] = {}
_READING_LOCK = threading.Lock()


def stalled_reads(older_than: float) -> list[tuple[str, str, float]]:
  """(source spec, shard path, seconds) of the shards this process is reading that have not
  given a record for more than `older_than` seconds, longest first."""
  now = time.monotonic()
  longest: dict[tuple[str, str], float] = {}
  with _READING_LOCK:
    for (spec, path, _), since in _READING.items():
      if since is not None and now - since > older_than:
        longest[spec, path] = max(longest.get((spec, path), 0.0), now - since)
  return sorted(((s, p, t) for (s, p), t in longest.items()), key=lambda r: -r[2])
_PROBE_SAMPLES = 16  # records read at startup to check that the fields exist


def list_files(pattern: str, what: str = "shard", allow_missing: bool = False) -> list[str]:
  """Expands braces and `*` globs; every named file must exist (or, with allow_missing, at
  least one). Raises ValueError naming the pattern and the missing files."""
  paths = []
  for path in expand_braces(pattern):
    if any(c in path for c in "*?["):
      found = sorted(tf.io.gfile.glob(path))
      if not found:
        raise ValueError(f"{what} pattern {pattern!r}: {path!r} matches no file")
      paths += found
    else:
      paths.append(path)
  if not paths:
    raise ValueError(f"{what} pattern {pattern!r} names no file")
  missing = _missing_files(paths)
  if missing and (not allow_missing or len(missing) == len(paths)):
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ValueError(f"{what} pattern {pattern!r}: {len(missing)} of {len(paths)} files do not "
                     f"exist: {shown}" + ("" if allow_missing else
                                          " (config.input.skip_missing_shards=True skips them)"))
  if missing:
    from absl import logging
    logging.warning("%s: skipping %d missing of %d shards, e.g. %s", pattern, len(missing),
                    len(paths), missing[0])
    paths = [p for p in paths if p not in set(missing)]
  return paths


def _missing_files(paths: Sequence[str]) -> list[str]:
  """Paths that do not exist, with one directory listing per directory (cheap on GCS)."""
  by_dir: dict[str, list[str]] = {}
  for path in paths:
    by_dir.setdefault(os.path.dirname(path), []).append(path)
  missing = []
  for directory, group in by_dir.items():
    try:
      names = {n.rstrip("/") for n in tf.io.gfile.listdir(directory or ".")}
    except tf.errors.NotFoundError:
      names = set()
    missing += [p for p in group if os.path.basename(p) not in names]
  return missing


def _as_text_list(value) -> list[bytes]:
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [v for item in value for v in _as_text_list(item)]
  if isinstance(value, bytes):
    return [value]
  return [str(value).encode("utf-8")]


class _ShardedSource(core.Source):
  """Sources made of shard files read record by record in Python (tar, TFRecord)."""
  what = "shard"

  def __init__(self, spec: str, location: str, fields: Fields, allow_missing: bool = False):
    super().__init__(spec, fields)
    self.paths = list_files(location, self.what, allow_missing)
    self._check_fields()

  # Subclasses: the raw samples of one shard (dicts of field -> bytes or list of bytes).
  def _samples(self, path: str) -> Iterator[dict]:
    raise NotImplementedError

  def _field(self, sample: dict, name: str, parsed_json: dict):
    """The value at field `name`, or None; JSON members are parsed once per sample."""
    head, _, rest = name.partition("/")
    if head not in sample:
      return None
    if not rest:
      return sample[head]
    if head not in parsed_json:
      try:
        parsed_json[head] = json.loads(sample[head])
      except (ValueError, UnicodeDecodeError):
        parsed_json[head] = _BAD_JSON
    value = parsed_json[head]
    if value is _BAD_JSON:
      raise _BadJson()
    for part in rest.split("/"):
      if not isinstance(value, dict) or part not in value:
        return None
      value = value[part]
    return value

  def _image_field(self, sample: dict) -> str | None:
    if self.fields.image:
      return self.fields.image
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)

  def _record(self, sample: dict) -> records.Record:
    """A raw sample -> Record; what is wrong becomes its `problem`, never an exception."""
    if webdataset.PROBLEM in sample:  # the unreadable rest of a shard
      return records.Record(b"", [], key=sample["__key__"].encode(),
                            problem=sample[webdataset.PROBLEM])
    try:
      return self._parse_record(sample)
    except Exception:  # noqa: BLE001  e.g. an image feature holding integers
      return records.Record(b"", [], key=str(sample.get("__key__", "")).encode(),
                    problem="malformed_record")

  def _parse_record(self, sample: dict) -> records.Record:
    parsed: dict = {}
    problem = ""
    image_field = self._image_field(sample)
    image = sample.get(image_field, b"") if image_field else b""
    if isinstance(image, list):
      image = image[0] if image else b""
    if image_field is None or image_field not in sample:
      problem = "missing_image"
    elif not isinstance(image, bytes):
      raise TypeError(f"image field {image_field!r} holds {type(image).__name__}")
    try:
      texts = _as_text_list(self._field(sample, self.fields.text, parsed))
    except _BadJson:
      texts, problem = [], problem or "bad_json"
    long_texts = []
    if self.fields.long_text:
      try:
        long_texts = _as_text_list(self._field(sample, self.fields.long_text, parsed))
      except _BadJson:
        pass  # the head falls back to the caption
    label = -1
    if self.fields.label:
      try:
        value = self._field(sample, self.fields.label, parsed)
        value = value[0] if isinstance(value, list) else value
        label = int(value) if value is not None else -1
      except (ValueError, TypeError, _BadJson):
        label = -1
    return records.Record(bytes(image), texts, long_texts, label,
                  str(sample.get("__key__", "")).encode(), problem)

  def _record_chunks(self, path, placeholders=True) -> Iterator[np.ndarray]:
    """A shard's packed records, _CHUNK at a time: one tf.data element per chunk keeps the
    Python -> TensorFlow crossing (~0.3 ms each) off the per-record cost. placeholders: keep
    the record that stands for a shard's unreadable rest (training counts it; an evaluation
    has no example for it)."""
    path = path.decode() if isinstance(path, bytes) else str(path)
    chunk = []
    reading = (self.spec, path, id(chunk))
    _READING[reading] = time.monotonic()
    try:
      for sample in self._samples(path):
        _READING[reading] = time.monotonic()
        if not placeholders and webdataset.PROBLEM in sample:
          continue
        chunk.append(records.pack(self._record(sample)))
        if len(chunk) == _CHUNK:
          _READING[reading] = None
          yield np.array(chunk, dtype=object)
          _READING[reading] = time.monotonic()
          chunk = []
      if chunk:
        _READING[reading] = None
        yield np.array(chunk, dtype=object)
    finally:
      with _READING_LOCK:
        _READING.pop(reading, None)

  def _shard_dataset(self, path: tf.Tensor, placeholders: bool = True) -> tf.data.Dataset:
    return tf.data.Dataset.from_generator(
        self._record_chunks, args=(path, placeholders),
        output_signature=tf.TensorSpec([None], tf.string)).unbatch()

  def _eval_shard_dataset(self, path: tf.Tensor) -> tf.data.Dataset:
    return self._shard_dataset(path, placeholders=False)

  def _check_fields(self):
    """Reads the first samples of the first readable shard; a field absent from all of them
    is a startup error naming it."""
    if not self.fields.text:
      raise ValueError(f"{self.spec}: no text field; set config.input.text_key (e.g. 'txt')")
    probe = []
    for path in self.paths[:4]:
      for sample in self._samples(path):
        if webdataset.PROBLEM not in sample:
          probe.append(sample)
        if len(probe) >= _PROBE_SAMPLES:
          break
      if probe:
        break
    if not probe:
      raise ValueError(f"{self.spec}: no readable sample in the first shards "
                       f"({', '.join(self.paths[:4])})")
    present = sorted({k for s in probe for k in s if k != "__key__"})
    where = f"{self.spec}: the first {len(probe)} samples of {self.paths[0]}"
    if not any(self._image_field(s) in s for s in probe if self._image_field(s)):
      raise ValueError(f"{where} have no image field "
                       f"{self.fields.image or '/'.join(IMAGE_EXTENSIONS)!r}; "
                       f"fields there: {present} (set config.input.image_key)")
    for role, name in (("text", self.fields.text), ("long_text", self.fields.long_text),
                       ("label", self.fields.label)):
      if not name:
        continue
      found = False
      for s in probe:
        try:
          found = self._field(s, name, {}) is not None
        except _BadJson:
          found = False
        if found:
          break
      if not found:
        raise ValueError(f"{where} have no {role} field {name!r}; fields there: {present} "
                         f"(set config.input.{role}_key, or ?{role}= in the spec)")

  item_name = "shard"

  @property
  def num_items(self):
    return len(self.paths)

  @staticmethod
  def _group_size(num, process_count, cycle_length):
    return max(1, min(cycle_length, num // process_count))

  def _items_per_group(self, process_count, cycle_length):
    return self._group_size(self.num_items, process_count, cycle_length)

  def _progress(self, group, offset, process_count, cycle_length):
    # Records of a group come shuffled from all its shards: the current group's shards are
    # all opened (once a record of it was consumed) and none is known to be finished.
    k = self._group_size(self.num_items, process_count, cycle_length)
    return group * k, group * k + (k if offset > 0 else 0)

  def train_records(self, *, seed, source_index, group, offset, process_index, process_count,
                    cycle_length, shuffle_buffer, origin=(0, 0)):
    num = len(self.paths)
    k = self._group_size(num, process_count, cycle_length)
    paths = np.array(self.paths, dtype=object)
    first_item = int(origin[0]) * num + int(origin[1])

    def group_paths(g):
      return paths[position.process_items(num, seed, source_index, process_index,
                                          process_count, int(g) * k, k, first_item)].astype(bytes)

    def with_paths(g):
      shard_paths = tf.numpy_function(group_paths, [g], tf.string, stateful=False)
      shard_paths.set_shape([k])
      return g, shard_paths

    base_seed = position.stream_seed(seed, source_index, process_index)
    first_group, first_offset = int(group), int(offset)

    def open_group(g, shard_paths):
      stream = tf.data.Dataset.from_tensor_slices(shard_paths).interleave(
          self._shard_dataset, cycle_length=k, block_length=1, num_parallel_calls=k,
          deterministic=True)
      if shuffle_buffer > 1:
        stream = stream.shuffle(shuffle_buffer, seed=g * 1_000_003 + base_seed,
                                reshuffle_each_iteration=False)
      return core.positioned(stream, g, first_group, first_offset)

    groups = tf.data.Dataset.range(first_group, core.INT64_MAX).map(with_paths)
    # One group at a time, in order; the parallel interleave opens the next group (and fills
    # its shuffle buffer) while this one is consumed, so group boundaries do not stall.
    return groups.interleave(lambda g, p: open_group(g, p), cycle_length=1,
                             num_parallel_calls=1, deterministic=True)

  def eval_records(self, process_index=0, process_count=1):
    if len(self.paths) >= process_count:
      paths = self.paths[process_index::process_count]
      return tf.data.Dataset.from_tensor_slices(paths).flat_map(self._eval_shard_dataset)
    ds = tf.data.Dataset.from_tensor_slices(self.paths).flat_map(self._eval_shard_dataset)
    return ds.shard(process_count, process_index)


_CHUNK = 64


class _BadJson(Exception):
  pass


_BAD_JSON = object()


class WebDatasetSource(_ShardedSource):
  kind = "wds"

  def __init__(self, spec, location, fields, allow_missing=False):
    if not fields.text:
      fields = dataclasses.replace(fields, text="txt")
    super().__init__(spec, location, fields, allow_missing)

  def _samples(self, path):
    return webdataset.read_shard(path)


class TFRecordSource(_ShardedSource):
  """img2dataset's TFRecord output: tf.train.Example with bytes features `jpg`, `txt`, ..."""
  kind = "tfrecord"

  def __init__(self, spec, location, fields, allow_missing=False):
    fields = dataclasses.replace(fields, image=fields.image or "jpg", text=fields.text or "txt")
    super().__init__(spec, location, fields, allow_missing)

  def _samples(self, path):
    try:
      records = tf.compat.v1.io.tf_record_iterator(path)
    except Exception:  # noqa: BLE001
      yield webdataset.placeholder(path, "unreadable_file")
      return
    index = 0
    while True:
      try:
        serialized = next(records)
      except StopIteration:
        return
      except tf.errors.DataLossError as e:
        yield webdataset.placeholder(
            path, "truncated_shard" if "truncated" in str(e) else "corrupt_shard")
        return
      except tf.errors.OpError:
        yield webdataset.placeholder(path, "unreadable_file")
        return
      sample = {"__key__": f"{path}:{index}"}
      try:
        features = tf.train.Example.FromString(serialized).features.feature
      except Exception:  # noqa: BLE001  (protobuf DecodeError)
        yield webdataset.placeholder(path, "corrupt_shard")
        return
      for name, feature in features.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        sample[name] = values[0] if len(values) == 1 and kind == "bytes_list" else values
      if "key" in sample and isinstance(sample["key"], bytes):
        sample["__key__"] = sample["key"].decode("utf-8", "replace")
      index += 1
      yield sample

  def _image_field(self, sample):
    return self.fields.image


def webdataset_source(pattern: str, image_key: str = "", text_key: str = "txt",
                      long_text_key: str = "", label_key: str = "") -> WebDatasetSource:
  """Webdataset tar shards (brace pattern, local or gs://)."""
  return WebDatasetSource(f"wds:{pattern}", pattern,
                          Fields(image_key, text_key, long_text_key, label_key))


def tfrecord_source(pattern: str, image_key: str = "jpg", text_key: str = "txt") -> TFRecordSource:
  """img2dataset TFRecord shards."""
  return TFRecordSource(f"tfrecord:{pattern}", pattern, Fields(image_key, text_key))
