"""Non-finite (NaN/Inf) steps: `config.nan_policy`, the limit in a window, the kept checkpoint.

The train step never applies a non-finite update (`train_step`); this module decides what the
run does about it, from the per-step `nonfinite` flags the loop fetches (docs/training.md).
"""
from __future__ import annotations

import collections


class NonFiniteError(RuntimeError):
  """Non-finite steps under nan_policy='stop', or more than the limit under 'skip'."""


class Guard:
  """Counts skipped steps and stops the run per `config.nan_policy`.

  'stop': the first non-finite step raises. 'skip': more than `config.max_nonfinite_steps`
  in any `config.nonfinite_window` consecutive steps raises. A streak is a run of non-finite
  steps less than a window apart; `kept_step` is the last checkpoint written before its first
  step, which the checkpoint rotation must keep until the streak ends. The state travels in
  each checkpoint's metadata (`metadata` / `from_metadata`), so a restart carries it on.
  """

  def __init__(self, config, step: int = 0, metadata: dict | None = None):
    """step, metadata: the restored checkpoint's step and its `metadata` (a fresh run: 0, None)."""
    self.policy = config.nan_policy
    self.limit = int(config.get("max_nonfinite_steps", 10))
    self.window = int(config.get("nonfinite_window", 100))
    m = metadata or {}
    self.total = int(m.get("nonfinite_steps_total", 0))
    self.recent = collections.deque(m.get("nonfinite_recent", ()))  # bad steps in the window
    self.kept_step = m.get("nonfinite_kept_step")
    self.saved_step = step or None  # the newest checkpoint written
    self.seen = step  # flags up to here are counted

  def update(self, history, step: int) -> int:
    """history: the per-step metrics of the steps ending at `step` (some maybe seen before).

    Returns how many of them were non-finite; raises NonFiniteError per the policy.
    """
    first = step - len(history) + 1
    flags = [bool(m["nonfinite"]) for m in history]
    new_bad = [first + i for i, bad in enumerate(flags) if bad and first + i > self.seen]
    self.seen = max(self.seen, step)
    if new_bad and self.policy == "stop":
      raise NonFiniteError(
          f"Non-finite loss or gradient in {sum(flags)} of the last {len(history)} steps "
          f"(up to step {step}); those updates were not applied and no checkpoint was written "
          "after them. Lower config.lr, set config.grad_clip_norm, or use "
          "config.nan_policy='skip' to drop such batches.")
    for bad in new_bad:
      if not self.recent or bad - self.recent[-1] >= self.window:  # a new streak
        self.kept_step = self.saved_step
      self.recent.append(bad)
      self.total += 1
    while self.recent and self.recent[0] <= step - self.window:
      self.recent.popleft()
    if len(self.recent) > self.limit:
      kept = ("" if self.kept_step is None else
              f" The last checkpoint before this streak, step {self.kept_step}, is kept.")
      raise NonFiniteError(
          f"{len(self.recent)} non-finite steps in the last {self.window} (up to step {step}; "
          f"{self.total} in this run), more than config.max_nonfinite_steps={self.limit}: the "
          "run has diverged and no checkpoint was written after this check." + kept +
          " Lower config.lr or set config.grad_clip_norm, and resume from a good checkpoint "
          "(or raise config.max_nonfinite_steps / config.nonfinite_window).")
    return sum(flags)

  def before_save(self, step: int) -> int | None:
    """The step the rotation must keep when saving `step` (None: no streak under way)."""
    if self.recent and step - self.recent[-1] < self.window:
      return self.kept_step
    self.kept_step = None
    return None

  def metadata(self, step: int) -> dict:
    """What a checkpoint at `step` carries for the next run (JSON)."""
    self.saved_step = step
    return {"nonfinite_steps_total": self.total, "nonfinite_recent": list(self.recent),
            "nonfinite_kept_step": self.kept_step}
