"""Checkpoints: which steps are kept, old checkpoints, and resuming on another machine shape
(a different device count, a different process count)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from superclip_jax import checkpoint, sharding, train, train_state
from tests import cpu_devices
from tests.test_input_pipeline import _good, _write_tar
from tests.test_train import tiny_config

REPO = cpu_devices.REPO


def _losses(workdir):
  """{step: loss} of metrics.jsonl (the last record of a step, as a resumed run appends)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "loss" in rec:
        out[rec["step"]] = rec["loss"]
  return out


_env = cpu_devices.env


def test_keeps_the_last_k_and_every_mth_and_resumes_from_the_latest(tmp_path):
  config = tiny_config(total_steps=10, ckpt_steps=1, keep_ckpts=2, keep_ckpt_steps=4,
                       log_training_steps=1)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir, stop_after=7)
  ckpt = checkpoint.Checkpointer(workdir, config)
  assert ckpt.all_steps() == [4, 6, 7]
  ckpt.close()
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 10
  ckpt = checkpoint.Checkpointer(workdir, config)
  assert ckpt.all_steps() == [4, 8, 9, 10]
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "4", "8", "9"]
  # The restart continued at step 8: every step trained once.
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == list(range(1, 11))


def test_a_checkpoint_from_before_data_origin_restores_with_zeros(tmp_path):
  config = tiny_config()
  factory = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
  state = factory.create()
  old = {k: v for k, v in vars(state).items() if k != "data_origin"}  # the old layout
  manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute(),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(3, args=ocp.args.StandardSave(old))
  manager.wait_until_finished()
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  restored = ckpt.restore(factory.abstract_with_shardings())
  ckpt.close()
  assert restored.data_origin.shape == (1, 2) and not np.asarray(restored.data_origin).any()
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)


def test_resume_maps_the_data_position_to_the_process_count_or_refuses(tmp_path):
  """The train loop's resume step on a file source saved by 2 processes, resumed by 1."""
  for shard in range(4):
    _write_tar(str(tmp_path / f"{shard}.tar"),
               [m for r in range(3) for m in _good(f"k{shard}{r}", r)])
  config = tiny_config()
  config.input.data = f"wds:{tmp_path}/{{0..3}}.tar"
  factory = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
  # Saved by 2 processes, each 1 record into its group 1 (groups of 2 shards: 4 // 2).
  state = factory.create().replace(data_position=np.array([[[1, 1]], [[1, 1]]], np.int32))
  with pytest.raises(ValueError, match="on_process_count_change='restart'"):
    train._resume_data_position(config, factory, state)
  config.input.on_process_count_change = "restart"
  resumed = train._resume_data_position(config, factory, state)
  # Process 0's group 1 is global shards 4 and 6, process 1's 5 and 7: restart at 4 (epoch 1).
  assert np.asarray(resumed.data_position).tolist() == [[[0, 0]]]
  assert np.asarray(resumed.data_origin).tolist() == [[1, 0]]
  assert resumed.data_position.sharding == factory.shardings.data_position


RESHARD = textwrap.dedent("""
    import pickle, sys
    import jax, ml_collections, numpy as np
    from configs import demo
    from superclip_jax import checkpoint, sharding, train, train_state

    phase, root = sys.argv[1], sys.argv[2]
    # The 8-device phase trains twice with the same step: compile it once.
    jax.config.update("jax_compilation_cache_dir", f"{root}/jax_cache")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    def config(data, fsdp):
      c = demo.get_config()
      c.model.variant, c.model.image_size = "mu/8", 32
      c.input.batch_size, c.total_steps, c.log_training_steps = 8, 6, 1
      c.evals = ml_collections.ConfigDict()
      c.mesh.data, c.mesh.fsdp = data, fsdp
      c.sharding_rules = ((".*", "fsdp"),)
      return c

    def dump(state, step):
      with open(f"{root}/state_{step}.pkl", "wb") as f:
        pickle.dump(jax.tree.map(np.asarray, jax.device_get(state)), f)

    def check_restore(c, step):
      # The restored state is the saved one, bit for bit, in the new mesh's shards.
      factory = train_state.StateFactory(c, sharding.make_mesh(c.mesh))
      ckpt = checkpoint.Checkpointer(f"{root}/run", c)
      assert ckpt.latest_step() == step, ckpt.all_steps()
      state = ckpt.restore(factory.abstract_with_shardings())
      ckpt.close()
      with open(f"{root}/state_{step}.pkl", "rb") as f:
        saved = pickle.load(f)
      jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), saved)
      for leaf, target in zip(jax.tree.leaves(state), jax.tree.leaves(factory.shardings)):
        assert leaf.sharding.is_equivalent_to(target, leaf.ndim), (leaf.sharding, target)
        assert len(leaf.addressable_shards) == jax.device_count()
        for shard in leaf.addressable_shards:
          assert shard.data.shape == target.shard_shape(leaf.shape)
      head = state.params["class_head"]["dense"]["kernel"]
      print("SHARD", head.shape, head.addressable_shards[0].data.shape)

    if phase == "8":
      assert jax.device_count() == 8
      train.train_and_evaluate(config(2, 4), f"{root}/ref")
      dump(train.train_and_evaluate(config(2, 4), f"{root}/run", stop_after=2), 2)
    elif phase == "4":
      assert jax.device_count() == 4
      check_restore(config(2, 2), 2)
      dump(train.train_and_evaluate(config(2, 2), f"{root}/run", stop_after=4), 4)
    else:
      assert jax.device_count() == 1
      check_restore(config(-1, 1), 4)
      train.train_and_evaluate(config(-1, 1), f"{root}/run")
    print("OK")
""")


def test_resume_on_4_then_1_device_reshards_and_continues_the_8_device_run(tmp_path):
  """8 devices (data 2 x fsdp 4) train steps 1-2, 4 devices (2 x 2) steps 3-4, 1 device 5-6."""
  shards = {}
  for devices in (8, 4, 1):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", RESHARD, str(devices), str(tmp_path)], cwd=REPO,
                       env=_env(devices), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]
    shards[devices] = [line for line in r.stdout.splitlines() if line.startswith("SHARD")]
    print(f"{devices} device(s): {time.monotonic() - t0:.0f} s")
  # The class head's kernel [64, 49408]: a quarter, then a half, then all of it per device.
  assert shards[4] == ["SHARD (64, 49408) (64, 24704)"], shards[4]
  assert shards[1] == ["SHARD (64, 49408) (64, 49408)"], shards[1]
  ref, run = _losses(str(tmp_path / "ref")), _losses(str(tmp_path / "run"))
  assert sorted(ref) == sorted(run) == list(range(1, 7))
  # Reduction order differs with the device count: equal within float32 tolerance.
  np.testing.assert_allclose([run[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)],
                             rtol=1e-4)


PROCESS_CONFIG = """
import ml_collections
from configs import demo


def get_config():
  c = demo.get_config()
  c.model.variant, c.model.image_size = "mu/8", 32
  c.input.batch_size, c.log_training_steps = 16, 1
  # A constant rate after one warmup step: total_steps only says where a run stops.
  c.schedule.decay_type, c.schedule.warmup_steps = "constant", 1
  c.evals = ml_collections.ConfigDict()
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.sharding_rules = ((".*", "fsdp"),)
  return c
"""


def test_demo_run_resumes_exactly_with_another_process_count(tmp_path):
  """1 process x 8 devices trains steps 1-2; 2 processes x 4 devices resume for steps 3-4:
  the losses of an uninterrupted 1 x 8 run (the demo data depends on examples_seen only)."""
  config_file = tmp_path / "config.py"
  config_file.write_text(PROCESS_CONFIG)
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")

  def main(workdir, total_steps, processes=1):
    flags = [f"--config={config_file}", f"--workdir={workdir}",
             f"--config.total_steps={total_steps}"]
    cmd = (["bash", "launch/local_processes.sh", str(processes), *flags] if processes > 1 else
           [sys.executable, "-m", "superclip_jax.main", *flags])
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=_env(8 // processes, cached=True), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"{processes} process(es), {total_steps} steps: {time.monotonic() - t0:.0f} s")
    return r

  main(ref, 4)
  main(run, 2)
  r = main(run, 4, processes=2)
  assert "step 3/4" in r.stdout and "step 1/4" not in r.stdout
  saved = checkpoint.Checkpointer(run, checkpoint.read_config(run))
  tables = {step: saved.manager.item_metadata(step).tree["data_position"].shape
            for step in (2, 4)}
  saved.close()
  assert tables == {2: (1, 1, 2), 4: (2, 1, 2)}  # saved by 1 process, then by 2
  losses_ref, losses_run = _losses(ref), _losses(run)
  assert sorted(losses_ref) == sorted(losses_run) == [1, 2, 3, 4]
  np.testing.assert_allclose([losses_run[s] for s in range(1, 5)],
                             [losses_ref[s] for s in range(1, 5)], rtol=1e-5)
