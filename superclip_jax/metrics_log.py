"""Where metrics go: a line on stdout, `metrics.jsonl`, and TensorBoard events — process 0 only."""
from __future__ import annotations

import json
import math
import sys
import time

import jax


from superclip_jax import fs


# In metrics.jsonl and TensorBoard, left off the stdout line.
_FILE_ONLY = ("step_time", "img_per_sec_per_device", "tflops_per_device", "compile_seconds",
              "flops_per_step", "peak_tflops_per_device", "peak_memory_bytes",
              "nonfinite_steps_total")


class MetricLogger:
  """write(step, metrics) logs one record; `progress` adds img/s and ETA to training lines."""

  def __init__(self, workdir: str, total_steps: int, batch_size: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.active = jax.process_index() == 0
    self._tb = None
    self._last = None  # (time, step) of the previous training record
    self._rate = None  # steps/s, smoothed
    if self.active:
      fs.makedirs(workdir)
      self._jsonl = fs.open(fs.join(workdir, "metrics.jsonl"), "a")
      import tensorflow as tf  # TF (CPU) writes the event files
      self._tb = tf.summary.create_file_writer(workdir)

  def progress(self, step: int, metrics: dict) -> dict:
    """Adds img_per_sec, step_time and eta_sec from the time since the previous call."""
    now = time.monotonic()
    if self._last is not None and step > self._last[1]:
      dt = (now - self._last[0]) / (step - self._last[1])
      rate = 1.0 / dt if dt > 0 else 0.0
      self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
      metrics = {**metrics, "step_time": dt, "img_per_sec": self.batch_size / dt,
                 "eta_sec": (self.total_steps - step) / self._rate if self._rate else math.nan}
    self._last = (now, step)
    return metrics

  def write(self, step: int, metrics: dict, *, echo: bool = True) -> None:
    if not self.active:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()  # each record readable at once (on gs://, an upload of the file)
    with self._tb.as_default(step=step):
      import tensorflow as tf
      for k, v in metrics.items():
        tf.summary.scalar(k, v)
    self._tb.flush()
    if echo:
      print(self.format_line(step, metrics), file=sys.stdout, flush=True)

  def format_line(self, step: int, metrics: dict) -> str:
    parts = [f"step {step}/{self.total_steps}"]
    for k, v in metrics.items():
      if k == "eta_sec":
        parts.append(f"ETA {_duration(v)}")
      elif k == "img_per_sec":
        parts.append(f"{v:.1f} img/s")
      elif k == "mfu":
        parts.append(f"MFU {100 * v:.1f}%")
      elif k == "data_wait_fraction":
        parts.append(f"data wait {100 * v:.0f}%")
      elif k not in _FILE_ONLY:
        parts.append(f"{k} {v:.4g}")
    return " | ".join(parts)

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
