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


def test_a_mixture_that_gains_a_source_is_refused_before_anything_is_written(tmp_path):
  from PIL import Image
  folders = []
  for f in ("a", "b"):
    for c in ("red", "blue"):
      (tmp_path / f / c).mkdir(parents=True)
      for i in range(2):
        Image.new("RGB", (32, 32), (200 * (c == "red"), 40 * i, 0)).save(
            tmp_path / f / c / f"{i}.png")
    folders.append(f"folder:{tmp_path / f}")
  workdir = tmp_path / "run"
  first = tiny_config(total_steps=2, ckpt_steps=2, log_training_steps=1)
  first.input.data = folders[0]
  train.train_and_evaluate(first, str(workdir))
  before = {p.name: p.stat().st_mtime_ns for p in workdir.iterdir()}
  saved = (workdir / "config.json").read_text()
  mixed = tiny_config(total_steps=4, ckpt_steps=2, log_training_steps=1)
  mixed.input.data = ";".join(folders)
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(mixed, str(workdir))
  message = str(error.value)
  assert "\n" not in message and "from 1 source(s)" in message and "to 2" in message
  assert "checkpoints are intact" in message and "ignore_unusable" not in message
  assert (workdir / "config.json").read_text() == saved
  assert {p.name: p.stat().st_mtime_ns for p in workdir.iterdir() if p.name != "train.lock"
          } == {k: v for k, v in before.items() if k != "train.lock"}
  # The checkpoints were left as they were: the saved mixture resumes from them.
  first.total_steps = 4
  assert int(train.train_and_evaluate(first, str(workdir)).step) == 4
