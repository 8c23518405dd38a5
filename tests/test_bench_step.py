"""bench/bench_step.py on CPU without TensorFlow, and bench/device_check.sh's commands."""
import json
import os
import subprocess
import sys

import pytest

from tests import cpu_devices

REPO = cpu_devices.REPO

NO_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; "
         "sys.argv = ['bench_step.py'] + sys.argv[1:]; "
         "runpy.run_path('bench/bench_step.py', run_name='__main__')")


def test_bench_step_times_superclip_and_clip_without_tensorflow(tmp_path):
  out = tmp_path / "bench.json"
  r = subprocess.run(
      [sys.executable, "-c", NO_TF, "--config=configs/demo.py:task=shapes", "--steps=3",
       "--warmup=1", "--batch_per_device=16", f"--json_out={out}"],
      cwd=REPO, env=cpu_devices.env(1, cached=True), capture_output=True, text=True,
      timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [run["mode"] for run in result["runs"]] == ["superclip", "clip"]
  assert "| superclip | demo/8 | xla | float32 | 16 |" in r.stdout
  for run in result["runs"]:
    assert run["step_ms_min"] <= run["step_ms"] <= run["step_ms_max"]
    assert abs(run["img_per_sec_per_device"] * run["step_ms"] / 1e3 - 16) < 1e-6
    assert abs(run["tflops_per_device"] * run["step_ms"] / 1e3
               - run["model_gflops_per_step"] / 1e3) < 1e-9
    assert abs(run["mfu_measured_peak"] * result["measured_peak_tflops"]
               - run["tflops_per_device"]) < 1e-9
  superclip, clip = result["runs"]
  assert superclip["model_gflops_per_step"] > clip["model_gflops_per_step"]  # the head
  assert abs(result["ratio_step_time"] - superclip["step_ms"] / clip["step_ms"]) < 1e-9
  assert result["peak_memory_bytes"] > 0 and result["versions"]["backend"] == "cpu"


def test_device_check_dry_run_prints_one_bench_per_attention(tmp_path):
  r = subprocess.run(["bash", "bench/device_check.sh", "--dry-run", str(tmp_path)], cwd=REPO,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 3
  for line, attention in zip(lines, ("cudnn", "jax", "xla")):
    assert line.startswith("python bench/bench_step.py --config=configs/b16.py ")
    assert "--batch_per_device=256" in line and "--config.model.dtype=bfloat16" in line
    assert f"--config.model.attention={attention} " in line
    assert line.endswith(os.path.join(str(tmp_path), f"{attention}.md"))
  assert not os.listdir(tmp_path)  # a dry run writes nothing


def _big_vision_checkout(tmp_path):
  """A big_vision checkout: $BIG_VISION_PATH, or one unpacked from the mirror that the tool
  library keeps beside the project (../.mirror); None where neither is here."""
  if os.environ.get("BIG_VISION_PATH"):
    return os.environ["BIG_VISION_PATH"]
  mirror = os.path.join(REPO, "..", ".mirror", "google-research+big_vision", "repo")
  if not os.path.isdir(mirror):
    return None
  archive = subprocess.run(["git", f"--git-dir={mirror}", "archive", "HEAD", "big_vision"],
                           capture_output=True, check=True).stdout
  subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
  return str(tmp_path)


def test_compare_bigvision_names_what_is_wrong_before_compiling(tmp_path):
  for flags, expected in (
      ([f"--bigvision_path={tmp_path}"], "is not a big_vision checkout"),
      (["--bigvision_path=/nonexistent", "--config.model.dtype=bfloat16"],
       "--config.model.dtype=float32")):
    r = subprocess.run(
        [sys.executable, "bench/bench_step.py", "--config=configs/demo.py", "--modes=clip",
         "--compare=bigvision", *flags], cwd=REPO, env=cpu_devices.env(1), capture_output=True,
        text=True, timeout=120)
    assert r.returncode != 0 and expected in r.stderr, r.stderr[-2000:]
    assert "compiling" not in r.stdout


def test_compare_bigvision_times_a_real_checkout_at_the_same_sizes(tmp_path):
  checkout = _big_vision_checkout(tmp_path)
  if checkout is None:
    pytest.skip("no big_vision checkout: set BIG_VISION_PATH to one")
  out = tmp_path / "bench.json"
  r = subprocess.run(
      [sys.executable, "bench/bench_step.py", "--config=configs/demo.py", "--modes=clip",
       "--compare=bigvision", f"--bigvision_path={checkout}", "--steps=3", "--warmup=1",
       "--batch_per_device=8", f"--json_out={out}"],
      cwd=REPO, env=cpu_devices.env(1, cached=True), capture_output=True, text=True,
      timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  clip, big_vision = result["runs"]
  assert (clip["mode"], big_vision["mode"]) == ("clip", "big_vision")
  ratio, = result["compare"]["ours"]
  # Two independent implementations of the same sizes: XLA counts nearly the same work and
  # the same parameters (what differs: OpenCLIP's ln_pre, big_vision's tanh GELU).
  assert abs(ratio["flops_ratio"] - clip["model_gflops_per_step"]
             / big_vision["model_gflops_per_step"]) < 1e-9
  assert 0.95 < ratio["flops_ratio"] < 1.05 and 0.99 < ratio["params_ratio"] < 1.01
  assert ratio["pairs"] == 3 and ratio["ratio_q1"] <= ratio["ratio_median"] <= ratio["ratio_q3"]
  assert "step time clip / big_vision: " in r.stdout
