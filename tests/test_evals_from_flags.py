"""Evaluations follow the data (issue 17.2): configs/demo.py's evals are retargeted and dropped
from the command line, through the same config flag as superclip_jax.main, and a run that
trains on other data than the demo while an eval still reads the demo says so."""
import os
import subprocess
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from superclip_jax import config_lib, evaluators, sharding, train_state
from tests import cpu_devices

REPO = cpu_devices.REPO
TINY = ("--config.model.variant=mu/8", "--config.model.image_size=32")  # a fast demo model


def parse(*args):
  """The config `python -m superclip_jax.main --config=... ARGS` would run (main's flag)."""
  argv = ["main", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def demo(arg="", *args):
  return parse(f"--config={os.path.join(REPO, 'configs', 'demo.py')}{arg}", *args)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """2 classes, 3 PNGs each, and one file named .png that is not an image (7 examples)."""
  root = tmp_path_factory.mktemp("test_folder")
  for c, name in enumerate(("cat", "dog")):
    (root / name).mkdir()
    for i in range(3):
      Image.new("RGB", (40, 36), (200 * c, 40 * i, 90)).save(root / name / f"{i}.png")
  (root / "dog" / "broken.png").write_bytes(b"not a png")
  return str(root)


def test_a_demo_eval_retargeted_from_flags_reads_the_folder(folder):
  config = demo("", *TINY, f"--config.evals.zeroshot.data=folder:{folder}",
                "--config.evals.zeroshot.batch_size=8", "--config.evals.zeroshot.every_steps=0")
  assert config.evals.zeroshot.data == f"folder:{folder}"
  assert config.evals.zeroshot.every_steps == 0
  assert config.evals.retrieval.data == "demo"  # the other eval is untouched
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  built = evaluators.build(config, factory.model, mesh, names=["zeroshot"])
  (name, every, evaluator), = built
  assert (name, every) == ("zeroshot", 0)
  _, classnames, _ = evaluator.tasks[""]  # the folder's classes, not the demo's three tasks
  assert classnames == ("cat", "dog")
  params = factory.create().params
  metrics = evaluator.run(jax.device_put(params, sharding.replicated(mesh)))
  # Every file of the folder once, the damaged one as a bad image (the demo renders 512).
  assert metrics["num_examples"] == 7 and metrics["num_bad_images"] == 1
  assert set(metrics) >= {"top1"} and not any(k.startswith("colour") for k in metrics)
  assert 0.0 <= metrics["top1"] <= 1.0


def test_demo_evals_are_settable_and_removable_from_the_command_line():
  assert sorted(demo().evals) == ["retrieval", "zeroshot"]
  assert {ev.data for ev in demo().evals.values()} == {"demo"}
  assert not demo(":evals=none").evals
  assert not demo("", "--config.evals={}").evals
  assert sorted(demo(":evals=zeroshot").evals) == ["zeroshot"]
  assert sorted(demo(":evals=retrieval,mode=clip").evals) == ["retrieval"]
  assert not demo(":mode=superclass").evals  # no text tower: neither eval
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r"evals='imagenet': unknown \['imagenet'\]; use zeroshot\+retrieval"):
    demo(":evals=imagenet")
  # num_examples: unset (all; the demo renders 512), and an integer from the flags.
  assert demo().evals.zeroshot.num_examples is None
  assert demo("", "--config.evals.zeroshot.num_examples=40").evals.zeroshot.num_examples == 40
  spec = "wds:/data/val/{000..003}.tar?label=cls"
  assert demo("", f"--config.evals.retrieval.data={spec}").evals.retrieval.data == spec


def test_a_warning_when_training_leaves_the_demo_but_an_eval_does_not(folder):
  own = "--config.input.data=wds:/data/shards/{000..009}.tar"
  assert config_lib.eval_data_warnings(demo()) == []  # the demo trains on the demo: fine
  lines = config_lib.eval_data_warnings(demo("", own))
  assert sorted(line.split(" reads ")[0] for line in lines) == ["config.evals.retrieval.data",
                                                               "config.evals.zeroshot.data"]
  assert all("'wds:/data/shards/{000..009}.tar'" in line and "evals=none" in line
             for line in lines)
  assert config_lib.eval_data_warnings(demo(":evals=none", own)) == []
  assert config_lib.eval_data_warnings(demo(
      ":evals=zeroshot", own, f"--config.evals.zeroshot.data=folder:{folder}")) == []
  # A split of the demo is the demo; an eval that leaves its data out reads its default.
  config = demo(":evals=zeroshot", own, "--config.evals.zeroshot.data=demo:zeroshot")
  with config.unlocked():
    config.evals.probe = dict(type="linear_probe")
  lines = config_lib.eval_data_warnings(config)
  assert sorted(line.split(" reads ")[0] for line in lines) == [
      "config.evals.probe.test_data", "config.evals.probe.train_data",
      "config.evals.zeroshot.data"]
  assert any("('demo:train', its default)" in line for line in lines)


def test_main_prints_the_warning_at_the_default_verbosity(tmp_path):
  """The real entry point, stopped right after start-up by an empty --workdir."""
  r = subprocess.run(
      [sys.executable, "-m", "superclip_jax.main", f"--config={REPO}/configs/demo.py",
       "--config.input.data=wds:/data/shards/{000..009}.tar", "--workdir= "],
      cwd=REPO, env=cpu_devices.env(1), capture_output=True, text=True, timeout=180)
  assert r.returncode != 0 and "--workdir is empty" in r.stderr, r.stderr[-3000:]
  warnings = [line for line in r.stdout.splitlines() if line.startswith("Warning: ")]
  assert sorted(w.split(" reads ")[0] for w in warnings) == [
      "Warning: config.evals.retrieval.data", "Warning: config.evals.zeroshot.data"], r.stdout
  assert all("reads the built-in demo data ('demo')" in w and "evals=none" in w
             for w in warnings)
