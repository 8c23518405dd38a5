"""Records the input pipeline skips, by reason, and the counts of the consumed training stream.

Nothing here is a process-global counter. A reader or transform that meets a bad record marks
it with a reason (a record's `problem`; `code(reason)` as its status), and a shard that cannot
be read on (`*_shard`, `unreadable_file`) yields one placeholder record with that reason, once
per opening: once per shard and epoch. The skipped records flow with the stream;
`input_pipeline` counts them per reason onto the next good example of their source
(`_skipped`), so the counts follow what the train step consumes: nothing read ahead, each
record or shard once, summed over processes by the step itself (`train_step`). `DataCounts`
adds them up on the host and travels in each checkpoint's metadata, so a resumed run goes on
counting from where it stood. A source that gives only bad records stops the run
(`TooManySkipped`, config.input.max_consecutive_skips). docs/data.md, "Bad records".
"""
from __future__ import annotations

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
    "unsupported_image",  # decodes, but no 8-bit reading (float outside [0, 1], NaN; transforms)
)
SHARD_REASONS = ("truncated_shard", "corrupt_shard", "unreadable_file")
# Epochs whose record counts the log carries per source: the newest one, and the two before
# (which can still grow while a shuffle buffer, or another process, is behind).
KEEP_EPOCHS = 3


def code(reason: str) -> int:
  """A record's status for `reason`: 1 + its index in REASONS (0 is a good record)."""
  if reason not in REASONS:
    raise ValueError(f"unknown bad-record reason {reason!r}; add it to REASONS")
  return 1 + REASONS.index(reason)


def reason_of(status: int) -> str:
  """The reason of a status `code` (a good record's 0 has none)."""
  return REASONS[int(status) - 1]


class DataCounts:
  """The training stream's counts since the run began, the same on every process.

  Fed the per-step metrics the loop fetches (`update`, like nonfinite.Guard): each step's
  `data_skipped` int [len(REASONS)] (the skipped records attached to its global batch) and
  `data_epoch` (the epoch of source 0's newest record in it, -1 if none); every example of a
  batch is a good record consumed. Travels in checkpoint metadata (`metadata`).
  """

  def __init__(self, batch_size: int, step: int = 0, metadata: dict | None = None,
               records_read: int = 0):
    """step, metadata: the restored checkpoint's step and metadata (a fresh run: 0, None);
    records_read: the count to assume where the metadata has none (an older checkpoint)."""
    m = metadata or {}
    self.batch_size = int(batch_size)
    saved = m.get("data_skipped", {})
    self.skipped = {reason: int(saved.get(reason, 0)) for reason in REASONS}
    self.records_read = int(m.get("data_records_read", records_read))
    self.epoch = int(m.get("data_epoch", 0))
    # Good records consumed per source and epoch, the last KEEP_EPOCHS epochs of each source.
    self.per_epoch = {int(s): {int(e): int(n) for e, n in epochs.items()}
                      for s, epochs in m.get("data_records_per_epoch", {}).items()}
    # A checkpoint from before per-pass counts, resumed mid-pass: that pass's count would
    # start at 0 and read as lost records, so epochs up to the first one met are not logged.
    self._partial = {} if step and "data_records_per_epoch" not in m else None
    self.seen = step  # steps up to here are counted

  def update(self, history, step: int) -> None:
    """history: the per-step metrics of the steps ending at `step` (some maybe seen before)."""
    first = step - len(history) + 1
    for i, metrics in enumerate(history):
      if first + i <= self.seen:
        continue
      self.records_read += self.batch_size
      if "data_skipped" in metrics:
        for reason, n in zip(REASONS, metrics["data_skipped"]):
          self.skipped[reason] += int(n)
        self.epoch = max(self.epoch, int(metrics["data_epoch"]))
      if "data_epoch_rows" in metrics:  # per source: newest epoch, rows by epoch % bins
        for source, (newest, *bins) in enumerate(metrics["data_epoch_rows"]):
          for b, n in enumerate(bins):
            self._add(source, int(newest) - (int(newest) - b) % len(bins), int(n))
    self.seen = max(self.seen, step)

  def _add(self, source: int, epoch: int, n: int) -> None:
    if n <= 0 or epoch < 0:
      return
    if self._partial is not None:
      self._partial.setdefault(source, epoch)
    epochs = self.per_epoch.setdefault(source, {})
    epochs[epoch] = epochs.get(epoch, 0) + n
    for old in sorted(epochs)[:-KEEP_EPOCHS]:
      del epochs[old]

  def metrics(self) -> dict[str, float]:
    """For the log: data/skipped (total), data/skipped_<reason> for the reasons seen,
    data/records_read (good records consumed), data/epoch (0: the first pass) and
    data/records_read_epoch<E> (good records of epoch E consumed; the last KEEP_EPOCHS epochs;
    data/source<S>/records_read_epoch<E> for the mixture's other sources): after epoch E the
    number of good records in the data, each read once."""
    out = {"data/skipped": float(sum(self.skipped.values()))}
    out.update({f"data/skipped_{reason}": float(n) for reason, n in self.skipped.items() if n})
    out.update({"data/records_read": float(self.records_read), "data/epoch": float(self.epoch)})
    for source, epochs in sorted(self.per_epoch.items()):
      prefix = "data/" if source == 0 else f"data/source{source}/"
      partial = -1 if self._partial is None else self._partial.get(source, -1)
      out.update({f"{prefix}records_read_epoch{e}": float(n) for e, n in sorted(epochs.items())
                  if e > partial})
    return out

  def metadata(self) -> dict:
    """What a checkpoint carries for the next run (JSON)."""
    return {"data_skipped": {reason: n for reason, n in self.skipped.items() if n},
            "data_records_read": self.records_read, "data_epoch": self.epoch,
            "data_records_per_epoch": {str(s): {str(e): n for e, n in epochs.items()
                                                if e > (self._partial or {}).get(s, -1)}
                                       for s, epochs in self.per_epoch.items()}}


class TooManySkipped(ValueError):
  """A source gave config.input.max_consecutive_skips records in a row that were all skipped:
  a source with nothing usable would otherwise be read forever, silently."""


_lock = threading.Lock()
_failures: list[TooManySkipped] = []


def too_many_skipped(spec: str, run: dict[str, int], limit: int) -> TooManySkipped:
  """The error for `spec` having skipped the records `run` ({reason: n}) in a row; kept for
  the reader of the stream, which ends there (`take_failure`)."""
  reasons = ", ".join(f"{reason}={n}" for reason, n in run.items() if n)
  error = TooManySkipped(
      f"{spec}: {sum(run.values())} records in a row were skipped, none usable ({reasons}). "
      "Is it the data meant, with the right fields? (docs/data.md, 'Bad records'); "
      f"config.input.max_consecutive_skips={limit} sets this limit (0: none).")
  with _lock:
    _failures.append(error)
  return error


def take_failure() -> TooManySkipped | None:
  """The first `too_many_skipped` error not taken yet (why a training stream ended)."""
  with _lock:
    return _failures.pop(0) if _failures else None
