"""Reading webdataset shards: tar files whose members `{key}.{ext}` group into samples.

A sample is the run of consecutive members sharing a key: `shard/000123.jpg`, `000123.txt`,
`000123.json` -> {'__key__': 'shard/000123', 'jpg': ..., 'txt': ..., 'json': ...}. The key is
the member path up to the first '.' of its file name; the extension is the rest, lower-cased
(`a.long.txt` -> 'long.txt'). This is what img2dataset writes and webdataset reads.

The reader is a small streaming ustar/GNU/pax parser written for damaged data: a shard that
cannot be opened, a header whose checksum fails, or a file that ends inside a member stops that
shard after yielding every sample read completely so far, then one placeholder sample
{'__key__': path, PROBLEM: reason} (a bad_records reason, counted once per shard read); it
never raises. Shards are read through `tf.io.gfile`, so `gs://` paths work.
"""
from __future__ import annotations

import io
import re
from typing import BinaryIO, Iterator

from superclip_jax.data import bad_records

BLOCK = 512
_READ_BUFFER = 4 << 20  # large reads: few round trips on GCS
_KEY_EXT = re.compile(r"^((?:.*/)?[^./][^/.]*)\.([^/]+)$")  # dir/key.ext; no hidden files
PROBLEM = "__problem__"  # a placeholder sample's field: why the rest of its shard is skipped


class _Damaged(Exception):
  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _read_exactly(f: BinaryIO, n: int) -> bytes:
  data = f.read(n)
  if len(data) != n:
    raise _Damaged("truncated_shard")
  return data


def _octal(field: bytes) -> int:
  if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
    return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
  digits = field.split(b"\0", 1)[0].strip()
  return int(digits, 8) if digits else 0


def _header_ok(header: bytes) -> bool:
  """The ustar checksum: the header's byte sum with its checksum field read as 8 spaces."""
  stored = header[148:156]
  try:
    expected = _octal(stored)
  except ValueError:
    return False
  return expected == sum(header) - sum(stored) + 8 * 32


def _pax_path(data: bytes) -> str | None:
  """The 'path' record of a pax extended header ('<len> path=<value>\\n' records)."""
  pos = 0
  while pos < len(data):
    space = data.find(b" ", pos)
    if space < 0:
      return None
    length = int(data[pos:space])
    record = data[space + 1:pos + length - 1]  # without the trailing newline
    key, _, value = record.partition(b"=")
    if key == b"path":
      return value.decode("utf-8", "replace")
    pos += length
  return None


def tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
  """(path, data) of each regular file in a tar stream. Raises _Damaged on damage."""
  long_name = None
  first = True
  while True:
    header = f.read(BLOCK)
    if not header and first:
      raise _Damaged("truncated_shard")  # an empty file is not a tar
    first = False
    if not header or header == bytes(BLOCK):  # end of archive (or a clean end of file)
      return
    if len(header) != BLOCK:
      raise _Damaged("truncated_shard")
    if not _header_ok(header):
      raise _Damaged("corrupt_shard")
    size = _octal(header[124:136])
    kind = header[156:157]
    padded = -(-size // BLOCK) * BLOCK
    if kind in (b"0", b"\0", b"7", b"L", b"x"):
      data = _read_exactly(f, size)
      _read_exactly(f, padded - size)
    else:  # directories, links, global pax headers, ...: skip their data
      _read_exactly(f, padded)
      continue
    if kind == b"L":  # GNU long name for the next member
      long_name = data.rstrip(b"\0").decode("utf-8", "replace")
      continue
    if kind == b"x":  # pax header for the next member
      long_name = _pax_path(data) or long_name
      continue
    if long_name is not None:
      name, long_name = long_name, None
    else:
      name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
      prefix = header[345:500].split(b"\0", 1)[0]
      if header[257:262] == b"ustar" and prefix:
        name = prefix.decode("utf-8", "replace") + "/" + name
    yield name, data


def samples_from_stream(f: BinaryIO, name: str = "") -> Iterator[dict]:
  """Samples {'__key__': str, ext: bytes, ...} of a tar stream; damage ends it with a
  placeholder {'__key__': name, PROBLEM: reason}."""
  current: dict | None = None
  problem = None
  try:
    for name, data in tar_members(f):
      match = _KEY_EXT.match(name)
      if match is None:
        continue  # no extension, or a hidden file: not part of any sample
      key, ext = match.group(1), match.group(2).lower()
      if current is not None and current["__key__"] != key:
        yield current
        current = None
      if current is None:
        current = {"__key__": key}
      current.setdefault(ext, data)  # a repeated extension keeps the first
  except _Damaged as e:
    problem = e.reason
  except (ValueError, OSError):  # malformed numbers, I/O errors mid-file
    problem = "corrupt_shard"
  if current is not None:
    yield current  # complete members only: the damaged one was never added
  if problem is not None:
    yield placeholder(name, problem)


def placeholder(name: str, reason: str) -> dict:
  """The sample that stands for the unreadable rest of shard `name` (a bad_records reason)."""
  bad_records.code(reason)  # a known reason
  return {"__key__": name, PROBLEM: reason}


def read_shard(path: str) -> Iterator[dict]:
  """Samples of one tar shard (local or gs://); an unopenable shard yields a placeholder."""
  import tensorflow as tf
  try:
    f = _open(path)
  except Exception:  # noqa: BLE001  (any filesystem error)
    yield placeholder(path, "unreadable_file")
    return
  try:
    yield from samples_from_stream(f, path)
  except tf.errors.OpError:
    yield placeholder(path, "unreadable_file")
  finally:
    f.close()


def _open(path: str) -> BinaryIO:
  """A buffered binary file: the OS's for local paths, tf.io.gfile's for URLs (gs://...)."""
  if "://" not in path:
    return open(path, "rb", buffering=_READ_BUFFER)
  import tensorflow as tf
  return io.BufferedReader(_GFileRaw(tf.io.gfile.GFile(path, "rb")), _READ_BUFFER)


class _GFileRaw(io.RawIOBase):
  """A GFile as a raw stream, so io.BufferedReader serves the parser's small reads in C."""

  def __init__(self, f):
    self._f = f

  def readable(self):
    return True

  def readinto(self, buffer):
    data = self._f.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def close(self):
    self._f.close()
    super().close()
