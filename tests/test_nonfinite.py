"""nan_policy='skip' has a limit, a run total, and keeps the last good checkpoint (issue 16.4)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
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


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("optax.eps", 0.0)])
def test_a_non_finite_update_from_finite_gradients_is_skipped_and_changes_nothing(field, value):
  # Both pass the loss and gradient-norm checks: the update itself is NaN (lr) or 0/0 for
  # the embeddings of tokens no caption holds (eps=0). validate() refuses both; this is the
  # step's own backstop, built here without validate().
  from tests.test_train import _setup, fixed_batch
  config = tiny_config()
  parent, _, name = field.rpartition(".")
  (config[parent] if parent else config)[name] = value
  factory, step = _setup(config)
  state = factory.create()
  new, metrics = step(state, fixed_batch(config))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["nonfinite"]) == 1.0
  for kept in ("params", "opt_state", "idf"):
    before, after = jax.tree.leaves(getattr(state, kept)), jax.tree.leaves(getattr(new, kept))
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
               for a, b in zip(before, after)), kept
  assert int(new.step) == 1  # only the step (and the data position) move on


def test_train_step_all_finite_against_numpy():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(3, 4)).astype(np.float32), "n": np.arange(3),
          "b": [np.float32(1.0), rng.normal(size=5)]}
  assert bool(train_step.all_finite(tree))
  for bad in (np.inf, -np.inf, np.nan):
    broken = dict(tree, b=[np.float32(1.0), np.r_[tree["b"][1][:4], bad]])
    assert not bool(train_step.all_finite(broken))
  big = {"a": np.full((4,), 3e38, np.float32)}  # finite, though its norm overflows float32
  with np.errstate(over="ignore"):
    assert bool(train_step.all_finite(big)) and not np.isfinite(np.sum(big["a"] ** 2))
