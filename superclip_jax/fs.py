"""The one filesystem layer for user paths: workdirs, data, exports, init_from, predict.

A plain path goes through the OS (no TensorFlow import: the train step's path stays free of
it). A URL (`gs://bucket/run`, `ram://x`, anything with `://`) goes through `tf.io.gfile`,
which knows GCS, TensorFlow's in-memory `ram://` and whatever filesystems TensorFlow has
registered. `etils.epath` is not used for user paths: it reads `ram://x` as the local path
`ram:/x`, which is how metrics once landed on local disk.

Orbax (checkpoints) takes the workdir's URL itself: tensorstore writes the arrays and
`etils.epath` the small files; for `gs://` it needs the `gcs` extra (docs/training.md).
"""
from __future__ import annotations

import builtins
import contextlib
import os
import shutil
from typing import IO


def is_url(path) -> bool:
  return "://" in str(path)


def join(base, *parts: str) -> str:
  """`base/part/...` for a path or a URL (os.path.join would not keep `gs://`)."""
  base = os.fspath(base)
  if not is_url(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(path) -> str:
  path = os.fspath(path).rstrip("/")
  return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def basename(path) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def _gfile():
  import tensorflow as tf  # only for URLs
  return tf.io.gfile


def exists(path) -> bool:
  path = os.fspath(path)
  return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
  path = os.fspath(path)
  return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def makedirs(path) -> None:
  path = os.fspath(path)
  if is_url(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
  """Names in a directory (without the trailing '/' gfile gives subdirectories)."""
  path = os.fspath(path)
  names = _gfile().listdir(path) if is_url(path) else os.listdir(path)
  return sorted(n.rstrip("/") for n in names)


def size(path) -> int:
  path = os.fspath(path)
  return _gfile().stat(path).length if is_url(path) else os.path.getsize(path)


def open(path, mode: str = "r") -> IO:  # noqa: A001  the layer's own open
  """A file object for `path` (also a context manager); modes 'r', 'rb', 'w', 'wb', 'a'."""
  path = os.fspath(path)
  return _gfile().GFile(path, mode) if is_url(path) else builtins.open(path, mode)


def read_bytes(path) -> bytes:
  """The file's bytes; a missing file raises FileNotFoundError on every filesystem."""
  return _read(path, "rb")


def read_text(path) -> str:
  return _read(path, "r")


def read_json(path):
  """The JSON value in `path`; a damaged file (cut short, not JSON) is a ValueError naming it."""
  import json  # pylint: disable=g-import-not-at-top
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}"
                     f"; {len(text):,} characters): it was cut short or edited. Restore it "
                     "(a workdir keeps earlier configs as config.<step>.json), or move it "
                     "aside to start the workdir's config afresh") from None


def _read(path, mode):
  path = os.fspath(path)
  if not is_url(path):
    with builtins.open(path, mode) as f:
      return f.read()
  with _not_found_as_oserror(path), _gfile().GFile(path, mode) as f:
    return f.read()


@contextlib.contextmanager
def _not_found_as_oserror(path):
  """TensorFlow's NotFoundError as FileNotFoundError: one exception on every filesystem."""
  try:
    yield
  except Exception as e:
    if type(e).__name__ == "NotFoundError":  # tf.errors.NotFoundError
      raise FileNotFoundError(f"{path} not found") from e
    raise


def write_bytes(path, data: bytes) -> None:
  """Writes the whole file at once: readers see the old or the new bytes, never a part (an
  object store's upload is atomic; on local disk, a temporary file renamed over it)."""
  path = os.fspath(path)
  if is_url(path):
    gfile = _gfile()
    if path.startswith("ram://") and gfile.exists(path):
      gfile.remove(path)  # TensorFlow's ram:// appends to an existing file on "w"
    with gfile.GFile(path, "wb") as f:
      f.write(data)
    return
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with builtins.open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def copy(src, dst) -> None:
  src, dst = os.fspath(src), os.fspath(dst)
  if is_url(src) or is_url(dst):
    _gfile().copy(src, dst, overwrite=True)
  else:
    shutil.copyfile(src, dst)


def remove(path) -> None:
  """Removes a file; a missing one raises FileNotFoundError on every filesystem."""
  path = os.fspath(path)
  if not is_url(path):
    os.remove(path)
    return
  with _not_found_as_oserror(path):
    _gfile().remove(path)


def rmtree(path) -> None:
  """Removes a directory and everything in it; a missing one is left alone."""
  path = os.fspath(path)
  if not is_url(path):
    if os.path.isdir(path):
      shutil.rmtree(path)
    return
  gfile = _gfile()
  if gfile.exists(path):
    gfile.rmtree(path)


def move_tree(src, dst) -> None:
  """Moves a directory: a rename on local disk; on object stores (no directory rename),
  a copy of every file, then the deletion of the source."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_url(src) and not is_url(dst):
    os.rename(src, dst)
    return
  gfile = _gfile()
  for root, _, files in gfile.walk(src):
    rel = root[len(src):].strip("/")
    target = join(dst, rel) if rel else dst
    gfile.makedirs(target)
    for name in files:
      gfile.copy(join(root, name), join(target, name), overwrite=True)
  gfile.rmtree(src)
