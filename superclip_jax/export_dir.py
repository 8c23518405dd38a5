"""An export folder as one unit: staged, committed by its manifest, checked by loaders.

`write` puts an export's files into OUT and writes `export_manifest.json` (format, step, every
file's bytes and sha256) last: the manifest is the commit point. Before the first file of a new
export reaches OUT, the old manifest is replaced by one marked incomplete, so a write killed
midway leaves a folder that loaders refuse, never a stale manifest beside a mix of files.
On local disk the files are first written to a staging folder inside OUT and then renamed into
place (the old export stays whole and loadable while the slow part runs); on object stores
(gs://), which have no rename, they are uploaded straight into OUT. `check` is the loaders' side.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
from typing import Iterable, Optional

from superclip_jax import fs

MANIFEST = "export_manifest.json"
STAGING_PREFIX = ".export-tmp-"


class ExportManifestError(ValueError):
  """A folder whose files are not the export its manifest describes (killed, mixed, edited)."""


def write(out: str, fmt: str, step: Optional[int], files: Iterable[tuple[str, bytes]]
          ) -> list[str]:
  """Writes (name, bytes) pairs into the existing folder `out`, then the manifest; returns
  the paths written."""
  listed = {}

  def put(directory, name, data):
    fs.write_bytes(fs.join(directory, name), data)
    listed[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

  if fs.is_url(out):
    _write_manifest(out, fmt, step, None)
    for name, data in files:
      put(out, name, data)
  else:
    for name in fs.listdir(out):
      if name.startswith(STAGING_PREFIX):  # left by an export killed while staging
        fs.rmtree(fs.join(out, name))
    staging = fs.join(out, f"{STAGING_PREFIX}{os.getpid()}")
    fs.makedirs(staging)
    try:
      for name, data in files:
        put(staging, name, data)
      _write_manifest(out, fmt, step, None)
      for name in listed:
        os.replace(fs.join(staging, name), fs.join(out, name))
    finally:
      fs.rmtree(staging)
  _write_manifest(out, fmt, step, listed)
  return [fs.join(out, name) for name in listed]


def _write_manifest(out, fmt, step, files: Optional[dict]) -> None:
  """files None: the marker of an export in progress (what a killed one leaves behind)."""
  manifest = {"format": fmt, "step": step, "complete": files is not None, "files": files or {},
              "superclip_jax": _version(),
              "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  fs.write_text(fs.join(out, MANIFEST), json.dumps(manifest, indent=2) + "\n")


def _version() -> Optional[str]:
  try:
    return importlib.metadata.version("superclip_jax")
  except importlib.metadata.PackageNotFoundError:
    return None


def check(directory: str, names: set[str], read: Iterable[str]) -> bool:
  """Checks the export in `directory` (whose files are `names`) before a loader reads `read`.

  Every listed file must exist with its size; those in `read` must also match their sha256
  (the others are not read, so their bytes cannot reach the loader). Returns False when the
  folder has no manifest (not written by `write`: a download, an older export), True when it
  has one that holds; raises ExportManifestError naming the folder and file otherwise.
  """
  if MANIFEST not in names:
    return False
  read = set(read)
  again = f"re-run the export into {directory}"
  edited = (f"{again}, or, if you edited it on purpose, delete {fs.join(directory, MANIFEST)} "
            "to load the folder as it is")
  try:
    manifest = json.loads(fs.read_text(fs.join(directory, MANIFEST)))
    listed, done = manifest["files"], manifest["complete"]
  except (ValueError, KeyError, TypeError) as e:
    raise ExportManifestError(f"{fs.join(directory, MANIFEST)} is unreadable ({e}): {again}"
                              ) from None
  what = f"the {manifest.get('format')} export of step {manifest.get('step')}"
  if not done:
    raise ExportManifestError(
        f"{directory} holds an unfinished export ({MANIFEST} marks {what} as in progress: "
        f"the export was killed midway and the files may mix two exports): {again}")
  for name in read:
    if name not in listed:
      raise ExportManifestError(f"{fs.join(directory, name)} is not a file of {what} that "
                                f"{MANIFEST} lists: the folder mixes exports; {again}")
  for name, entry in sorted(listed.items()):
    path = fs.join(directory, name)
    if name not in names:
      raise ExportManifestError(f"{path} is missing ({MANIFEST} lists it in {what}): {again}")
    if fs.size(path) != entry["bytes"]:
      raise ExportManifestError(f"{path} has {fs.size(path):,} bytes, {MANIFEST} says "
                                f"{entry['bytes']:,} ({what}): {edited}")
    if name in read and sha256(path) != entry["sha256"]:
      raise ExportManifestError(
          f"{path} is not the file {what} wrote (sha256 differs from {MANIFEST}: the folder "
          f"mixes exports, or it was edited): {edited}")
  return True


def sha256(path) -> str:
  digest = hashlib.sha256()
  with fs.open(path, "rb") as f:
    while chunk := f.read(1 << 23):
      digest.update(chunk)
  return digest.hexdigest()
