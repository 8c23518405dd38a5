"""nan_policy='skip' has a limit, a run total, and keeps the last good checkpoint (issue 16.4)."""
import json

import jax.numpy as jnp
import pytest

from superclip_jax import checkpoint, nonfinite, train, train_step
from tests.test_train import tiny_config


def _poison_from(monkeypatch, first_bad_step):
  """Every step from `first_bad_step` on sees a NaN image: a diverged run, inside the jit."""
  make = train_step.make_train_step

  def make_poisoned(*args, **kwargs):
    inner = make(*args, **kwargs)

    def step(state, batch):
      bad = state.step + 1 >= first_bad_step
      return inner(state, dict(batch, image=jnp.where(bad, jnp.nan, batch["image"])))
    return step
  monkeypatch.setattr(train_step, "make_train_step", make_poisoned)


def test_skip_stops_past_the_limit_counts_across_restarts_and_keeps_the_last_good_ckpt(
    tmp_path, monkeypatch):
  _poison_from(monkeypatch, 4)
  config = tiny_config(total_steps=12, ckpt_steps=2, keep_ckpts=1, log_training_steps=1,
                       nan_policy="skip", max_nonfinite_steps=3, nonfinite_window=5)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir, stop_after=5)  # steps 4, 5 skipped
  with pytest.raises(nonfinite.NonFiniteError, match="max_nonfinite_steps=3"):
    train.train_and_evaluate(config, workdir)  # 6 and 7 too: 4 in a window of 5
  with open(tmp_path / "metrics.jsonl") as f:
    records = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
  assert max(records) == 6  # the check at step 7 stops before its record
  assert [records[s]["nonfinite_steps_total"] for s in range(1, 7)] == [0, 0, 0, 1, 2, 3]
  assert [records[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
  ckpt = checkpoint.Checkpointer(workdir, config)
  # keep_ckpts=1, but step 2 (the last before the streak) survives the rotation; nothing
  # after the check at step 7 was written.
  assert ckpt.all_steps() == [2, 6]
  assert ckpt.metadata(6)["nonfinite_steps_total"] == 3
  ckpt.close()


def test_the_kept_step_is_released_once_a_window_passes_without_a_bad_step():
  config = tiny_config(nan_policy="skip", max_nonfinite_steps=2, nonfinite_window=4)
  guard = nonfinite.Guard(config)
  ok, bad = {"nonfinite": 0.0}, {"nonfinite": 1.0}
  guard.update([ok, ok], 2)
  guard.metadata(2)  # saved step 2
  assert guard.update([bad, ok], 4) == 1
  assert guard.before_save(4) == 2
  guard.metadata(4)
  assert guard.update([ok, ok, ok, ok], 8) == 0
  assert guard.before_save(8) is None and guard.total == 1
  with pytest.raises(nonfinite.NonFiniteError, match="3 non-finite steps in the last 4"):
    guard.update([bad, ok, bad, bad], 12)


def test_stop_policy_stops_right_after_the_bad_step_not_at_the_next_log_step(
    tmp_path, monkeypatch):
  _poison_from(monkeypatch, 3)
  config = tiny_config(total_steps=12, ckpt_steps=2, keep_ckpts=5, log_training_steps=10,
                       nan_policy="stop")
  with pytest.raises(nonfinite.NonFiniteError, match=r"1 of the last 3 steps \(up to step 3\)"):
    train.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  assert ckpt.all_steps() == [2]  # nothing after the bad step, though 4 was a checkpoint step
  ckpt.close()
