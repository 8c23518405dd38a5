"""A record as every source yields it, before decoding: one packed tf.string.

A `Record` holds the encoded image bytes, candidate captions, long captions, label, key and a
bad_records reason found while reading. One scalar per record keeps tf.data's per-element cost
low; Python unpacks it where the image is decoded anyway.
"""
from __future__ import annotations

import dataclasses
import struct

import tensorflow as tf


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


def tf_pack(image, texts, long_texts, label, key):
  """A record's tensors -> its packed tf.string [] (in a tf.data map)."""
  packed = tf.numpy_function(_pack_tensors, [image, texts, long_texts, label, key], tf.string,
                             stateful=False)
  packed.set_shape([])
  return packed
