"""The entry point end to end on the demo data (tiny model), and exact resumption."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from superclip_jax import checkpoint, host_malloc, train
from tests import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.variant=mu/8", "--config.model.image_size=32",
        "--config.input.batch_size=16", "--config.log_training_steps=2",
        "--config.evals.zeroshot.num_examples=40", "--config.evals.zeroshot.batch_size=16"]


def _run_main(workdir, *flags, env=None):
  cmd = [sys.executable, "-m", "superclip_jax.main", "--config=configs/demo.py",
         f"--workdir={workdir}", *TINY, *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=cpu_devices.compile_cache(os.environ if env is None else env))


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_demo_entry_point_runs_logs_evaluates_and_resumes(tmp_path):
  wd = str(tmp_path / "run")
  r = _run_main(wd, "--config.total_steps=4", "--config.ckpt_steps=2",
                "--config.evals.zeroshot.every_steps=4")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 4/4" in r.stdout and "ETA" in r.stdout and "img/s" in r.stdout
  recs = _records(wd)
  train_recs = [x for x in recs if "loss" in x]
  assert [x["step"] for x in train_recs] == [2, 4]
  assert {"class_loss", "contrastive_loss", "lr", "logit_scale"} <= set(train_recs[-1])
  # Throughput in every record, and what the step costs in the first one.
  perf = {"img_per_sec_per_device", "step_time", "tflops_per_device", "mfu",
          "data_wait_fraction"}
  assert all(perf <= set(x) for x in train_recs)
  first, last = train_recs[0], train_recs[-1]
  assert {"peak_memory_bytes", "compile_seconds", "flops_per_step"} <= set(first)
  assert "compile_seconds" not in last and first["peak_memory_bytes"] > 0
  assert last["img_per_sec_per_device"] * last["step_time"] == pytest.approx(16)  # 1 device
  assert last["tflops_per_device"] == pytest.approx(
      first["flops_per_step"] / last["step_time"] / 1e12)
  assert last["mfu"] == pytest.approx(last["tflops_per_device"]
                                      / first["peak_tflops_per_device"])
  assert 0 <= last["data_wait_fraction"] <= 1 and "MFU " in r.stdout
  zs = [x for x in recs if any("zeroshot" in k for k in x)]
  assert zs and 0.0 <= zs[-1]["zeroshot/colour_top1"] <= 1.0
  # The run ends with its final evals beside their chance levels (5 positions, 6 colours;
  # R@1 of 512 images among 512 for text-to-image), as metrics.jsonl has them.
  summary = r.stdout[r.stdout.index("Final evals at step 4 (64 samples seen):"):]
  position = 100 * zs[-1]["zeroshot/position_top1"]
  assert re.search(rf"zeroshot/position_top1 +{position:.1f}%   \(chance 20\.0%\)", summary)
  assert "zeroshot/colour_top1" in summary and "(chance 16.7%)" in summary
  assert "retrieval/text_to_image_R@1 " in summary and "(chance 0.2%)" in summary
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd))
  assert checkpoint.Checkpointer(wd, checkpoint.read_config(wd)).latest_step() == 4
  # The versions in use: printed once at start-up and kept beside the config.
  import flax
  import jaxlib
  with open(os.path.join(wd, "versions.json")) as f:
    used = json.load(f)
  assert (used["jax"], used["jaxlib"], used["flax"]) == (
      jax.__version__, jaxlib.__version__, flax.__version__)
  assert used["python"] == "%d.%d.%d" % sys.version_info[:3] and used["backend"] == "cpu"
  assert r.stdout.count(f"jax {jax.__version__} |") == 1

  # Same workdir, longer run: resumes at step 5 instead of starting over. It also runs with
  # the opt-in malloc settings (a restart of the process at start-up; docs/training.md).
  tuned = host_malloc.supported()
  env = dict(os.environ, **({host_malloc.OPT_IN: "tuned"} if tuned else {}))
  r = _run_main(wd, "--config.total_steps=6", "--config.ckpt_steps=2",
                "--config.evals.zeroshot.every_steps=100", "--verbosity=0",
                "--config.profile_steps=(5, 6)", env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 6/6" in r.stdout and "step 2/6" not in r.stdout
  traces = [f for _, _, files in os.walk(os.path.join(wd, "profile")) for f in files
            if f.endswith(".xplane.pb")]
  assert traces, "config.profile_steps wrote no jax.profiler trace"
  assert ("glibc malloc tuned for XLA:CPU" in r.stderr) == tuned


def test_a_typo_in_a_config_field_is_an_error_naming_it(tmp_path):
  r = _run_main(str(tmp_path / "x"), "--config.totl_steps=3")
  assert r.returncode != 0
  assert "totl_steps" in r.stderr


def test_a_start_up_error_is_its_message_without_a_traceback(tmp_path):
  missing = str(tmp_path / "none" / "000.tar")
  r = _run_main(str(tmp_path / "x"), f"--config.input.data=wds:{missing}")
  assert r.returncode != 0
  assert f"Error: shard pattern {missing!r}: 1 of 1 files do not exist" in r.stderr
  assert "Traceback" not in r.stderr, r.stderr[-3000:]


def _tiny_demo_config(total_steps):
  sys.path.insert(0, REPO)
  from configs import demo
  c = demo.get_config()
  c.model.variant = "mu/8"
  c.model.image_size = 32
  c.input.batch_size = 8
  c.total_steps = total_steps
  c.ckpt_steps = 3
  c.log_training_steps = 2
  c.evals = {}
  return c


def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path):
  straight = train.train_and_evaluate(_tiny_demo_config(6), str(tmp_path / "a"))
  train.train_and_evaluate(_tiny_demo_config(6), str(tmp_path / "b"), stop_after=4)
  resumed = train.train_and_evaluate(_tiny_demo_config(6), str(tmp_path / "b"))
  assert resumed.examples_seen.value() == straight.examples_seen.value() == 48
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               straight, resumed)
  a, b = _records(str(tmp_path / "a")), _records(str(tmp_path / "b"))
  assert [r["loss"] for r in a if r["step"] == 6] == [r["loss"] for r in b if r["step"] == 6]


def test_sigterm_checkpoints_and_exits_then_resumes(tmp_path):
  import signal
  import time
  wd = str(tmp_path / "pre")
  cmd = [sys.executable, "-u", "-m", "superclip_jax.main", "--config=configs/demo.py",
         f"--workdir={wd}", *TINY, "--config.total_steps=100000", "--config.ckpt_steps=100000",
         "--config.evals.zeroshot.every_steps=100000"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=cpu_devices.compile_cache(os.environ))
  deadline = time.time() + 300
  for line in proc.stdout:  # wait until training is under way
    if line.startswith("step ") or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  step = checkpoint.Checkpointer(wd, checkpoint.read_config(wd)).latest_step()
  assert step is not None and 2 <= step < 100000
  r = _run_main(wd, f"--config.total_steps={step + 2}", "--config.evals.zeroshot.every_steps=0")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"step {step + 2}/{step + 2}" in r.stdout
  assert f"Resuming from step {step} (" in r.stdout  # a start-up fact, shown by default


def test_init_from_an_official_checkpoint_carries_its_idf_counts(tmp_path, capsys):
  """cap_fq/num_samples of a superclip-format checkpoint become the run's IDF counts: after
  one step they are the imported counts plus that step's, the counts a run from an openclip
  export (no statistics) has after the same step."""
  from superclip_jax import export, sharding, train_state
  config = _tiny_demo_config(1)
  source = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
  params = jax.tree.map(np.asarray, source.fresh_params())
  rng = np.random.default_rng(0)
  imported = {"doc_freq": rng.integers(0, 5000, config.model.vocab_size).astype(np.float64),
              "num_docs": 5000.0}
  export.write_export(params, source.model, "superclip", str(tmp_path / "sc"), idf=imported,
                      batch_size=config.input.batch_size)
  export.write_export(params, source.model, "openclip", str(tmp_path / "oc"))
  states = {}
  for name in ("sc", "oc"):
    config.init_from = str(tmp_path / name)
    states[name] = train.train_and_evaluate(config, str(tmp_path / f"run_{name}"))
  assert "init_from: IDF counts of 5,000 captions carried over" in capsys.readouterr().out
  step_counts = states["oc"].idf.doc_freq.value().astype(np.int64)
  np.testing.assert_array_equal(states["sc"].idf.doc_freq.value().astype(np.int64),
                                imported["doc_freq"].astype(np.int64) + step_counts)
  assert states["sc"].idf.num_docs.value() == 5000 + states["oc"].idf.num_docs.value()


def test_init_from_an_openclip_export_loads_towers_and_keeps_a_fresh_head(tmp_path, capsys):
  from superclip_jax import export, sharding, train_state
  source_cfg = _tiny_demo_config(1)
  source_cfg.seed = 7
  source = train_state.StateFactory(source_cfg, sharding.make_mesh(source_cfg.mesh))
  source_params = jax.tree.map(np.asarray, source.fresh_params())
  export.write_export(source_params, source.model, "openclip", str(tmp_path / "oc"))

  config = _tiny_demo_config(1)
  config.init_from = str(tmp_path / "oc")
  config.lr = 0.0  # one step that changes nothing: the state is what was loaded
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert (f"init_from {tmp_path / 'oc'}: openclip layout; kept freshly initialised: class_head"
          in capsys.readouterr().out)
  fresh = train_state.StateFactory(config, sharding.make_mesh(config.mesh)).fresh_params()
  for tower in ("visual", "text"):
    jax.tree.map(np.testing.assert_array_equal, source_params[tower],
                 jax.tree.map(np.asarray, state.params[tower]))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, fresh["class_head"]),
               jax.tree.map(np.asarray, state.params["class_head"]))
