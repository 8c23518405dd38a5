"""Small misconfigurations are clear errors or warnings (issue 16.7)."""
import logging
import re

import pytest

from superclip_jax import config_lib, train
from tests.test_train import tiny_config


@pytest.mark.parametrize("field,value,message", [
    ("keep_ckpts", 0, "keep_ckpts=0 keeps no checkpoint"),
    ("lr", -1e-3, "config.lr=-0.001: use a number >= 0.0 (0 keeps the weights fixed"),
    ("lr", float("nan"), "config.lr=nan: use a finite number"),
    ("optax.eps", 0.0, "config.optax.eps=0.0: use a number > 0.0 (Adam divides"),
    ("optax.b2", 1.0, "config.optax.b2=1.0: use a number in [0.0, 1.0)"),
    ("optax.b1", float("inf"), "config.optax.b1=inf: use a finite number"),
    ("wd", float("-inf"), "config.wd=-inf: use a finite number"),
    ("grad_clip_norm", -1.0, "config.grad_clip_norm=-1.0: use a number >= 0.0"),
    ("loss.class_weight", float("nan"), "config.loss.class_weight=nan: use a finite number"),
    ("model.logit_scale_init", float("inf"), "config.model.logit_scale_init=inf"),
    ("schedule.warmup_steps", -5, "config.schedule.warmup_steps=-5: use a number >= 0"),
    ("preemption_barrier_seconds", 0.0, "config.preemption_barrier_seconds=0.0"),
    ("wd_mults", ((".*", float("nan")),), "config.wd_mults=('.*', nan): each rule"),
    ("input.crop_scale", (0.0, 1.0), "config.input.crop_scale=(0.0, 1.0): use (low, high)"),
    ("model.context_length", 0, "context_length=0"),
    ("model.context_length", 6, "template 'a photo of a {}.': it needs 8"),
    ("max_nonfinite_steps", -1, "max_nonfinite_steps=-1"),
    ("nonfinite_window", 0, "nonfinite_window=0"),
])
def test_a_bad_value_is_an_error_naming_the_field(field, value, message):
  config = tiny_config()
  *parents, name = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.validate(config)


def test_an_empty_workdir_is_an_error(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where the old code wrote
  with pytest.raises(ValueError, match="--workdir is empty"):
    train.train_and_evaluate(tiny_config(total_steps=1), "")
  assert not list(tmp_path.iterdir())


def test_init_from_is_ignored_out_loud_when_the_workdir_has_checkpoints(tmp_path, caplog):
  train.train_and_evaluate(tiny_config(total_steps=1), str(tmp_path))
  config = tiny_config(total_steps=1, init_from="/no/such/model.pt")
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path))  # already at step 1: nothing to train
  assert "config.init_from='/no/such/model.pt' is ignored" in caplog.text
