"""Counts of records the input pipeline skipped, by reason, for the logged metrics.

Readers and transforms call `count(reason)` instead of raising: a bad record never stops a run,
but a source that gives only bad ones does (`TooManySkipped`, config.input.max_consecutive_skips).
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


class TooManySkipped(ValueError):
  """A source gave config.input.max_consecutive_skips records in a row that were all skipped:
  a source with nothing usable would otherwise be read forever, silently."""


_failures: list[TooManySkipped] = []


def too_many_skipped(spec: str, run: int, limit: int) -> TooManySkipped:
  """The error for `spec` having skipped `run` records in a row, with the reasons so far; kept
  for the reader of the stream, which ends there (`take_failure`)."""
  so_far = ", ".join(f"{reason}={n}" for reason, n in counts().items() if n)
  error = TooManySkipped(
      f"{spec}: {run} records in a row were skipped, none usable (skipped so far in this "
      f"process: {so_far or 'none counted'}). Is it the data meant, with the right fields? "
      f"(docs/data.md, 'Bad records'); config.input.max_consecutive_skips={limit} sets this "
      "limit (0: none).")
  with _lock:
    _failures.append(error)
  return error


def take_failure() -> TooManySkipped | None:
  """The first `too_many_skipped` error not taken yet (why a training stream ended)."""
  with _lock:
    return _failures.pop(0) if _failures else None
