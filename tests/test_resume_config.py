"""Resuming a workdir with another config (issue 16.6): shape changes are refused before
anything is written; lr, total_steps, frozen, ... are allowed and the old config is kept."""
import json

import jax
import numpy as np
import pytest

from superclip_jax import checkpoint, train
from tests.test_train import tiny_config


def test_a_shape_change_is_refused_untouched_and_a_lit_unfreeze_resumes(tmp_path):
  workdir = str(tmp_path)
  first = tiny_config(total_steps=2, ckpt_steps=2, log_training_steps=1, frozen=("visual/.*",))
  locked = train.train_and_evaluate(first, workdir)
  saved = (tmp_path / "config.json").read_text()

  other = tiny_config(total_steps=4, ckpt_steps=2, log_training_steps=1)
  other.model.image_size = 48
  other.model.scan_layers = True
  with pytest.raises(ValueError, match=r"(?s)model.image_size: 32 \(saved\) -> 48.*"
                                       r"model.scan_layers.*new --workdir"):
    train.train_and_evaluate(other, workdir)
  assert (tmp_path / "config.json").read_text() == saved  # predict/export still work
  checkpoint.load_params(workdir)

  # LiT's second phase: the image tower unfrozen, another lr and a longer run.
  second = tiny_config(total_steps=4, ckpt_steps=2, log_training_steps=1, lr=1e-3)
  state = train.train_and_evaluate(second, workdir)
  assert int(state.step) == 4
  assert json.loads((tmp_path / "config.json").read_text())["lr"] == 1e-3
  assert (tmp_path / "config.2.json").read_text() == saved  # what trained steps 1-2
  before = jax.tree.leaves(locked.params["visual"])
  after = jax.tree.leaves(state.params["visual"])
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after))
