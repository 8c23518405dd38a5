"""Counts of records the input pipeline skipped, by reason, for the logged metrics.

Readers and transforms call `count(reason)` instead of raising: a bad record never stops a run.
The counts are per process and cumulative since it started (they are not checkpointed); they
include records read ahead into tf.data's buffers, so they can lead the step a little.
"""
from __future__ import annotations

import collections
import contextlib
import threading

# Every reason the pipeline reports, so the logged keys are stable from the first step.
REASONS = (
    "bad_image",          # undecodable, truncated or zero-byte image data
    "missing_image",      # no image field in the record
    "missing_caption",    # no caption field, or only empty captions
    "caption_not_utf8",   # caption bytes are not valid UTF-8
    "bad_json",           # a caption was to come from a JSON member that does not parse
    "malformed_record",   # a record whose fields have unexpected types
    "truncated_shard",    # a tar/TFRecord file ended inside a record; the rest is unreadable
    "corrupt_shard",      # a tar header checksum or TFRecord CRC failed; the rest is skipped
    "unreadable_file",    # a shard or image file could not be opened
)

_lock = threading.Lock()
_counts: collections.Counter = collections.Counter()
_local = threading.local()


def count(reason: str, n: int = 1) -> None:
  if reason not in REASONS:
    raise ValueError(f"unknown bad-record reason {reason!r}; add it to REASONS")
  if getattr(_local, "muted", False):
    return
  with _lock:
    _counts[reason] += n


@contextlib.contextmanager
def muted():
  """Reads in this thread are not counted (startup probes: the pipeline counts them later)."""
  _local.muted = True
  try:
    yield
  finally:
    _local.muted = False


def counts() -> dict[str, int]:
  """{reason: records (or shards, for *_shard / unreadable_file) skipped} in this process."""
  with _lock:
    return {reason: int(_counts[reason]) for reason in REASONS}


def reset() -> None:
  with _lock:
    _counts.clear()
