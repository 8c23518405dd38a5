"""Data sources: one spec string -> records, endless and positioned for training, in order for eval.

Spec strings (`config.input.data`, or each entry of a mixture):
  wds:PATTERN       webdataset tar shards, local or gs://: `wds:gs://b/laion/{00000..01023}.tar`
  tfrecord:PATTERN  img2dataset TFRecord shards (features `jpg`, `txt`, `key`)
  tfds:NAME:SPLIT   a TFDS dataset: `tfds:coco_captions:train`, `tfds:imagenet2012:validation`,
                    `tfds:cifar10:train[:90%]`
  folder:PATH       an image-folder tree, one subfolder per class (the ILSVRC val layout)
A PATTERN ending in `.tar` or `.tfrecord` may leave out its kind. Braces expand
(`{000..099}`, `{a,b}`) and `*` globs. Options after `?` override config.input's field names
for this source only: `wds:/d/{0..9}.tar?text=json/caption&long_text=long.txt`
(keys: image, text, long_text, label, data_dir).

Fields name where a record's parts are:
  webdataset  a member extension (`jpg`, `txt`, `long.txt`, `cls`) or a path into the JSON
              member (`json/caption`, `json/captions`); the image defaults to the first of
              jpg/jpeg/png/webp present.
  TFRecord    a feature name (`jpg`, `txt`).
  TFDS        a feature path (`image`, `captions/text`, `label`).
A field holding several strings (a list in JSON, a tfds Sequence) offers several captions; one
is chosen per example. Without a text field, a labelled source (tfds ClassLabel, a folder's
class) gets captions from `label_templates` and the class names.

A record, as every source yields it (before decoding), is one tf.string: a packed `Record`
(encoded image bytes, candidate captions, long captions, label, key, and a bad_records reason
found while reading). One scalar per record keeps tf.data's per-element cost low; Python
unpacks it where the image is decoded anyway.

Training streams (`train_records`) are endless, deterministic and resumable. Each process
reads its own part: the shards (or files) of epoch e are a seeded permutation, the epochs are
concatenated, and process p of P takes items p, p+P, p+2P, ... of that sequence — so every
process gets the same number of shards (+-1) however the counts divide, even with fewer shards
than processes, and within an epoch no two processes read the same shard. A process reads its
shards in groups of `cycle_length` (interleaved, then shuffled through `shuffle_buffer` with a
seed of the group): record r of group g has the position (g, r), and a stream restarted at
(g, r) yields exactly what followed it (only group g is re-read to get there). Training
streams come in micro-batches of up to MICRO_BATCH records of one group:
{'record': string [m], 'group': int64 [m], 'offset': int64 [m]}.

A stream may start at a global item `origin` (epoch, item of that epoch's permutation) instead
of the beginning: process p then takes global items origin + p, origin + p + P, ... and groups
count from there. `restart_positions` uses it when the number of processes changes
(config.input.on_process_count_change='restart'): every process of the new run starts at the
first item that some old process had not finished, so items are re-read, never skipped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import struct
import urllib.parse
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from superclip_jax.data import bad_records, webdataset

KINDS = ("wds", "tfrecord", "tfds", "folder")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
_INT64_MAX = np.iinfo(np.int64).max
_FOLDER_CHUNK = 4096  # files per position group of a folder source
_PROBE_SAMPLES = 16  # records read at startup to check that the fields exist

MICRO_BATCH = 16  # records per Python call when decoding


@dataclasses.dataclass
class Record:
  image: bytes  # encoded
  texts: list[bytes]  # candidate captions (one is chosen)
  long_texts: list[bytes] = dataclasses.field(default_factory=list)  # for the class head
  label: int = -1
  key: bytes = b""
  problem: str = ""  # a bad_records reason found while reading ('' if none)


def pack(record: Record) -> bytes:
  """Record -> bytes: a little-endian header (label, counts, part lengths), then the parts."""
  parts = [record.image, record.key, record.problem.encode(), *record.texts,
           *record.long_texts]
  header = struct.pack(f"<qII{len(parts)}I", record.label, len(record.texts),
                       len(record.long_texts), *map(len, parts))
  return header + b"".join(parts)


def unpack(data: bytes) -> Record:
  label, num_texts, num_long = struct.unpack_from("<qII", data)
  num_parts = 3 + num_texts + num_long
  lengths = struct.unpack_from(f"<{num_parts}I", data, 16)
  parts, pos = [], 16 + 4 * num_parts
  for n in lengths:
    parts.append(data[pos:pos + n])
    pos += n
  return Record(parts[0], parts[3:3 + num_texts], parts[3 + num_texts:], label, parts[1],
                parts[2].decode())


def _pack_tensors(image, texts, long_texts, label, key) -> bytes:
  """tf.numpy_function body: a record's tensors (TFDS, folders) -> packed bytes."""
  return pack(Record(bytes(image), [bytes(t) for t in texts], [bytes(t) for t in long_texts],
                     int(label), bytes(key)))


def _tf_pack(image, texts, long_texts, label, key):
  packed = tf.numpy_function(_pack_tensors, [image, texts, long_texts, label, key], tf.string,
                             stateful=False)
  packed.set_shape([])
  return packed


def _positioned(items: tf.data.Dataset, group, first_group: int, first_offset: int,
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


@dataclasses.dataclass(frozen=True)
class Fields:
  """Where a record's parts are in a source ('' = the source's default / none)."""
  image: str = ""
  text: str = ""
  long_text: str = ""
  label: str = ""
  label_templates: tuple[str, ...] = DEFAULT_TEMPLATES


# ---------------------------------------------------------------------------------------------
# Spec strings and file patterns.

def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
  """'kind:location?k=v&...' -> (kind, location, options). Raises ValueError naming the spec."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"data spec {spec!r} is empty; use e.g. 'wds:/data/{{00000..00099}}.tar'")
  spec = spec.strip()
  if spec == "demo":
    return "demo", "", {}
  kind, sep, rest = spec.partition(":")
  if not sep or kind not in KINDS:
    if re.search(r"\.tar(\?|$)", spec):
      kind, rest = "wds", spec
    elif re.search(r"\.(tfrecord|tfrec)(\?|$)", spec):
      kind, rest = "tfrecord", spec
    else:
      raise ValueError(f"data spec {spec!r}: start it with one of {', '.join(KINDS)} followed "
                       "by ':' (e.g. 'wds:/data/{00000..00099}.tar'), or 'demo'")
  location, _, query = rest.partition("?")
  options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False))
  unknown = set(options) - {"image", "text", "long_text", "label", "data_dir"}
  if unknown:
    raise ValueError(f"data spec {spec!r}: unknown option(s) {sorted(unknown)}; known: image, "
                     "text, long_text, label, data_dir")
  if not location:
    raise ValueError(f"data spec {spec!r} names no data after '{kind}:'")
  return kind, location, options


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """'a{00..02}b{x,y}' -> ['a00bx', 'a00by', 'a01bx', ...] (webdataset's shard patterns)."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numeric:
    first, last = numeric.group(1), numeric.group(2)
    width = len(first) if len(first) > 1 and first.startswith("0") else 0
    step = 1 if int(last) >= int(first) else -1
    options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
  elif "," in body:
    options = body.split(",")
  else:
    options = ["{" + body + "}"]  # not a brace expression: keep it literally
  tails = expand_braces(pattern[match.end():])
  return [pattern[:match.start()] + option + tail for option in options for tail in tails]


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


# ---------------------------------------------------------------------------------------------
# Which items (shards, files) a process reads.

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
# Sources.

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

  def restart_positions(self, rows, origin, new_count: int, cycle_length: int):
    """Where the processes of a run with `new_count` processes start so that nothing the old
    run had not consumed is skipped, when `len(rows)` processes stood at `rows` int [old, 2]
    (group, offset) counted from `origin` (epoch, item).

    Returns (origin (epoch, item), rows int64 [new_count, 2], repeated): all new processes
    start at the first global item some old process had not finished; `repeated` counts the
    items from there on that an old process had already opened (read again, fully).
    """
    rows = np.asarray(rows, np.int64).reshape(-1, 2)
    old, num = len(rows), self.num_items
    base = int(origin[0]) * num + int(origin[1])
    progress = [self._progress(int(g), int(r), old, cycle_length) for g, r in rows]
    restart = min(base + p + done * old for p, (done, _) in enumerate(progress))
    repeated = 0
    for p, (_, started) in enumerate(progress):
      first_after = max(0, -(-(restart - base - p) // old))  # p's first item at/after restart
      repeated += max(0, started - first_after)
    return (restart // num, restart % num), np.zeros((new_count, 2), np.int64), repeated

  def eval_records(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """This process's part of the records (packed strings), once, in a fixed order."""
    raise NotImplementedError

  def __repr__(self):
    return f"{type(self).__name__}({self.spec!r})"


def _labels_as_captions(classnames: Sequence[str], templates: Sequence[str]) -> tf.Tensor:
  """[num_classes, num_templates] captions: each template filled with each class name."""
  return tf.constant([[t.format(c) for t in templates] for c in classnames], tf.string)


def _as_text_list(value) -> list[bytes]:
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [v for item in value for v in _as_text_list(item)]
  if isinstance(value, bytes):
    return [value]
  return [str(value).encode("utf-8")]


class _ShardedSource(Source):
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

  def _record(self, sample: dict) -> Record:
    """A raw sample -> Record; what is wrong becomes its `problem`, never an exception."""
    try:
      return self._parse_record(sample)
    except Exception:  # noqa: BLE001  e.g. an image feature holding integers
      return Record(b"", [], key=str(sample.get("__key__", "")).encode(),
                    problem="malformed_record")

  def _parse_record(self, sample: dict) -> Record:
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
    return Record(bytes(image), texts, long_texts, label,
                  str(sample.get("__key__", "")).encode(), problem)

  def _record_chunks(self, path) -> Iterator[np.ndarray]:
    """A shard's packed records, _CHUNK at a time: one tf.data element per chunk keeps the
    Python -> TensorFlow crossing (~0.3 ms each) off the per-record cost."""
    path = path.decode() if isinstance(path, bytes) else str(path)
    chunk = []
    for sample in self._samples(path):
      chunk.append(pack(self._record(sample)))
      if len(chunk) == _CHUNK:
        yield np.array(chunk, dtype=object)
        chunk = []
    if chunk:
      yield np.array(chunk, dtype=object)

  def _shard_dataset(self, path: tf.Tensor) -> tf.data.Dataset:
    return tf.data.Dataset.from_generator(
        self._record_chunks, args=(path,),
        output_signature=tf.TensorSpec([None], tf.string)).unbatch()

  def _check_fields(self):
    """Reads the first samples of the first readable shard; a field absent from all of them
    is a startup error naming it."""
    if not self.fields.text:
      raise ValueError(f"{self.spec}: no text field; set config.input.text_key (e.g. 'txt')")
    probe = []
    with bad_records.muted():
      for path in self.paths[:4]:
        for sample in self._samples(path):
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
      return paths[process_items(num, seed, source_index, process_index, process_count,
                                 int(g) * k, k, first_item)].astype(bytes)

    def with_paths(g):
      shard_paths = tf.numpy_function(group_paths, [g], tf.string, stateful=False)
      shard_paths.set_shape([k])
      return g, shard_paths

    base_seed = stream_seed(seed, source_index, process_index)
    first_group, first_offset = int(group), int(offset)

    def open_group(g, shard_paths):
      records = tf.data.Dataset.from_tensor_slices(shard_paths).interleave(
          self._shard_dataset, cycle_length=k, block_length=1, num_parallel_calls=k,
          deterministic=True)
      if shuffle_buffer > 1:
        records = records.shuffle(shuffle_buffer, seed=g * 1_000_003 + base_seed,
                                  reshuffle_each_iteration=False)
      return _positioned(records, g, first_group, first_offset)

    groups = tf.data.Dataset.range(first_group, _INT64_MAX).map(with_paths)
    # One group at a time, in order; the parallel interleave opens the next group (and fills
    # its shuffle buffer) while this one is consumed, so group boundaries do not stall.
    return groups.interleave(lambda g, p: open_group(g, p), cycle_length=1,
                             num_parallel_calls=1, deterministic=True)

  def eval_records(self, process_index=0, process_count=1):
    if len(self.paths) >= process_count:
      paths = self.paths[process_index::process_count]
      return tf.data.Dataset.from_tensor_slices(paths).flat_map(self._shard_dataset)
    ds = tf.data.Dataset.from_tensor_slices(self.paths).flat_map(self._shard_dataset)
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
      bad_records.count("unreadable_file")
      return
    index = 0
    while True:
      try:
        serialized = next(records)
      except StopIteration:
        return
      except tf.errors.DataLossError as e:
        bad_records.count("truncated_shard" if "truncated" in str(e) else "corrupt_shard")
        return
      except tf.errors.OpError:
        bad_records.count("unreadable_file")
        return
      sample = {"__key__": f"{path}:{index}"}
      try:
        features = tf.train.Example.FromString(serialized).features.feature
      except Exception:  # noqa: BLE001  (protobuf DecodeError)
        bad_records.count("corrupt_shard")
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


class TfdsSource(Source):
  """A TFDS dataset; images are passed on encoded (tfds.decode.SkipDecoding) and decoded by us."""
  kind = "tfds"

  def __init__(self, spec: str, name: str, split: str, fields: Fields, data_dir: str | None):
    import tensorflow_datasets as tfds
    super().__init__(spec, fields)
    self.name, self.split = name, split
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001  (tfds raises DatasetNotFoundError and others)
      raise ValueError(f"{spec}: TFDS has no dataset {name!r} ({e})") from e
    features = self.builder.info.features
    image = fields.image or "image"
    image_feature = _tfds_feature(features, image, spec, "image")
    if not isinstance(image_feature, tfds.features.Image):
      raise ValueError(f"{spec}: feature {image!r} is a {type(image_feature).__name__}, "
                       "not an Image; set config.input.image_key")
    label = fields.label
    if not label and not fields.text and "label" in features:
      label = "label"
    if label:
      label_feature = _tfds_feature(features, label, spec, "label")
      if isinstance(label_feature, tfds.features.ClassLabel):
        self.classnames = tuple(label_feature.names)
    if fields.text:
      _tfds_feature(features, fields.text, spec, "text")
    if fields.long_text:
      _tfds_feature(features, fields.long_text, spec, "long_text")
    self.fields = dataclasses.replace(fields, image=image, label=label)
    self._decoders = _skip_decoding(image)
    self._captions = (_labels_as_captions(self.classnames, fields.label_templates)
                      if self.classnames and not fields.text else None)

  def _split(self, process_index, process_count):
    if process_count == 1:
      return self.split
    import tensorflow_datasets as tfds
    return tfds.even_splits(self.split, process_count)[process_index]

  def _dataset(self, split):
    try:
      return self.builder.as_dataset(split=split, shuffle_files=False, decoders=self._decoders)
    except Exception as e:  # noqa: BLE001  (not prepared, unknown split, ...)
      raise ValueError(f"{self.spec}: cannot read split {split!r} of {self.name!r}: {e}") from e

  def _record(self, example):
    f = self.fields
    label = (tf.cast(tf.reshape(_get(example, f.label), []), tf.int64) if f.label
             else tf.constant(-1, tf.int64))
    if f.text:
      texts = tf.reshape(_get(example, f.text), [-1])
    elif self._captions is not None:
      texts = tf.gather(self._captions, tf.maximum(label, 0))
    else:
      texts = tf.zeros([0], tf.string)
    long_texts = (tf.reshape(_get(example, f.long_text), [-1]) if f.long_text
                  else tf.zeros([0], tf.string))
    return _tf_pack(_get(example, f.image), tf.cast(texts, tf.string),
                    tf.cast(long_texts, tf.string), label, tf.constant(self.name, tf.string))

  def restart_positions(self, rows, origin, new_count, cycle_length):
    """TFDS splits the data per process (tfds.even_splits), so there is no global item order:
    every new process starts at the beginning of the least advanced old process's epoch
    (position group). `repeated` counts the (process, epoch) passes an old process had begun
    from there on."""
    del cycle_length
    rows = np.asarray(rows, np.int64).reshape(-1, 2)
    first = int(rows[:, 0].min())
    repeated = int(sum(g - first + (r > 0) for g, r in rows))
    return tuple(origin), np.tile([[first, 0]], (new_count, 1)).astype(np.int64), repeated

  item_name = "epoch pass"

  def train_records(self, *, seed, source_index, group, offset, process_index, process_count,
                    cycle_length, shuffle_buffer, origin=(0, 0)):
    del cycle_length, origin  # TFDS interleaves its own files; restarts move the group only
    if not self.fields.text and self._captions is None:
      raise ValueError(f"{self.spec}: training needs captions: set config.input.text_key (or "
                       "?text=) to a text feature, or label_key to a ClassLabel feature")
    base = self._dataset(self._split(process_index, process_count))
    base_seed = stream_seed(seed, source_index, process_index)
    first_group, first_offset = int(group), int(offset)

    def epoch(g):  # a position group of a TFDS source is one epoch of this process's split
      records = base
      if shuffle_buffer > 1:
        records = records.shuffle(shuffle_buffer, seed=g * 1_000_003 + base_seed,
                                  reshuffle_each_iteration=False)
      return _positioned(records, g, first_group, first_offset, self._record)

    return tf.data.Dataset.range(first_group, _INT64_MAX).interleave(
        epoch, cycle_length=1, num_parallel_calls=1, deterministic=True)

  def eval_records(self, process_index=0, process_count=1):
    return self._dataset(self._split(process_index, process_count)).map(
        self._record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _tfds_feature(features, path: str, spec: str, role: str):
  node = features
  for part in path.split("/"):
    inner = getattr(node, "feature", None)  # tfds Sequence wraps a feature (dict)
    if inner is not None and not hasattr(node, "keys"):
      node = inner
    if not hasattr(node, "keys") or part not in node.keys():
      available = sorted(features.keys())
      raise ValueError(f"{spec}: the dataset has no {role} feature {path!r}; top-level "
                       f"features: {available} (set config.input.{role}_key or ?{role}=)")
    node = node[part]
  return node


def _get(example, path: str):
  for part in path.split("/"):
    example = example[part]
  return example


def _skip_decoding(image_path: str):
  import tensorflow_datasets as tfds
  decoders: dict = {}
  node = decoders
  parts = image_path.split("/")
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  node[parts[-1]] = tfds.decode.SkipDecoding()
  return decoders


class ImageFolderSource(Source):
  """PATH/<class>/<image>: class index = position of <class> in sorted order."""
  kind = "folder"

  def __init__(self, spec: str, path: str, fields: Fields):
    super().__init__(spec, fields)
    if not tf.io.gfile.isdir(path):
      raise ValueError(f"{spec}: image folder {path!r} does not exist")
    classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                     if tf.io.gfile.isdir(os.path.join(path, d.rstrip("/"))))
    if not classes:
      raise ValueError(f"{spec}: {path!r} has no class subfolders (expected PATH/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
      directory = os.path.join(path, name)
      for f in sorted(tf.io.gfile.listdir(directory)):
        if f.lower().endswith(FOLDER_EXTENSIONS):
          files.append(os.path.join(directory, f))
          labels.append(label)
    if not files:
      raise ValueError(f"{spec}: no images ({', '.join(FOLDER_EXTENSIONS)}) under {path!r}")
    self.classnames = tuple(classes)
    self.files = np.array(files, dtype=object)
    self.labels = np.array(labels, np.int64)
    self._captions = [[t.format(c).encode() for t in fields.label_templates] for c in classes]

  def _read_and_pack(self, path, label) -> bytes:
    label = int(label)
    return pack(Record(_read_file_or_empty(path), self._captions[label], [], label, bytes(path)))

  def _record(self, path_and_label):
    packed = tf.numpy_function(self._read_and_pack, list(path_and_label), tf.string,
                               stateful=False)
    packed.set_shape([])
    return packed

  item_name = "file"

  @property
  def num_items(self):
    return len(self.files)

  def _progress(self, group, offset, process_count, cycle_length):
    del process_count, cycle_length  # files are read in order, one position each
    return (group * _FOLDER_CHUNK + offset,) * 2

  def train_records(self, *, seed, source_index, group, offset, process_index, process_count,
                    cycle_length, shuffle_buffer, origin=(0, 0)):
    del cycle_length, shuffle_buffer  # every epoch is a full permutation of the files
    num = len(self.files)
    first_group, first_offset = int(group), int(offset)
    first_item = int(origin[0]) * num + int(origin[1])

    def chunk(g):
      idx = process_items(num, seed, source_index, process_index, process_count,
                          int(g) * _FOLDER_CHUNK, _FOLDER_CHUNK, first_item)
      return self.files[idx].astype(bytes), self.labels[idx]

    def open_chunk(g):
      paths, labels = tf.numpy_function(chunk, [g], [tf.string, tf.int64], stateful=False)
      files = tf.data.Dataset.from_tensor_slices(
          (tf.reshape(paths, [_FOLDER_CHUNK]), tf.reshape(labels, [_FOLDER_CHUNK])))
      return _positioned(files, g, first_group, first_offset, self._record)

    return tf.data.Dataset.range(first_group, _INT64_MAX).interleave(
        open_chunk, cycle_length=1, num_parallel_calls=1, deterministic=True)

  def eval_records(self, process_index=0, process_count=1):
    files = self.files[process_index::process_count].astype(bytes)
    labels = self.labels[process_index::process_count]
    return tf.data.Dataset.from_tensor_slices((files, labels)).map(
        lambda path, label: self._record((path, label)), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)


def _read_file_or_empty(path) -> bytes:
  try:
    with tf.io.gfile.GFile(path.decode(), "rb") as f:
      return f.read()
  except Exception:  # noqa: BLE001  a vanished or unreadable file is a bad record
    bad_records.count("unreadable_file")
    return b""


# ---------------------------------------------------------------------------------------------
# Public constructors.

def from_spec(spec: str, fields: Fields = Fields(), *, skip_missing_shards: bool = False,
              data_dir: str | None = None) -> Source:
  """The source a spec string names; options in the spec override `fields`. Validates paths
  and fields now (startup), so a wrong name fails before training, with a message naming it."""
  kind, location, options = parse_spec(spec)
  fields = dataclasses.replace(fields, **{k: v for k, v in options.items() if k != "data_dir"})
  if kind == "wds":
    return WebDatasetSource(spec, location, fields, skip_missing_shards)
  if kind == "tfrecord":
    return TFRecordSource(spec, location, fields, skip_missing_shards)
  if kind == "tfds":
    name, split = _split_tfds_location(location, spec)
    return TfdsSource(spec, name, split, fields, options.get("data_dir") or data_dir)
  if kind == "folder":
    return ImageFolderSource(spec, location, fields)
  raise ValueError(f"data spec {spec!r}: 'demo' is not a file source")


def _split_tfds_location(location: str, spec: str) -> tuple[str, str]:
  """'name[:version]:split' -> (name, split); the split may hold ':' inside [...]."""
  bracket = location.find("[")
  head = location if bracket < 0 else location[:bracket]
  colon = head.rfind(":")
  if colon <= 0:
    raise ValueError(f"data spec {spec!r}: write TFDS sources as 'tfds:NAME:SPLIT', e.g. "
                     "'tfds:coco_captions:train'")
  return location[:colon], location[colon + 1:]


def webdataset_source(pattern: str, image_key: str = "", text_key: str = "txt",
                      long_text_key: str = "", label_key: str = "") -> WebDatasetSource:
  """Webdataset tar shards (brace pattern, local or gs://)."""
  return WebDatasetSource(f"wds:{pattern}", pattern,
                          Fields(image_key, text_key, long_text_key, label_key))


def tfrecord_source(pattern: str, image_key: str = "jpg", text_key: str = "txt") -> TFRecordSource:
  """img2dataset TFRecord shards."""
  return TFRecordSource(f"tfrecord:{pattern}", pattern, Fields(image_key, text_key))


def tfds_source(name: str, split: str, image_key: str = "image", text_key: str = "",
                label_key: str = "", long_text_key: str = "", data_dir: str | None = None,
                label_templates: Sequence[str] = DEFAULT_TEMPLATES) -> TfdsSource:
  """A TFDS dataset split, e.g. tfds_source('imagenet2012', 'validation', label_key='label')
  or tfds_source('coco_captions', 'val', text_key='captions/text'). `classnames` holds the
  ClassLabel names when there is a label."""
  return TfdsSource(f"tfds:{name}:{split}", name, split,
                    Fields(image_key, text_key, long_text_key, label_key,
                           tuple(label_templates)), data_dir)


def image_folder_source(path: str, label_templates: Sequence[str] = DEFAULT_TEMPLATES
                        ) -> ImageFolderSource:
  """PATH/<class>/<image> (e.g. ILSVRC2012 val sorted into synset folders); `classnames` are
  the folder names in sorted order, the label their index."""
  return ImageFolderSource(f"folder:{path}", path,
                           Fields(label="label", label_templates=tuple(label_templates)))
