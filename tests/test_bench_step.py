"""bench/bench_step.py on CPU without TensorFlow, and bench/device_check.sh's commands."""
import json
import os
import subprocess
import sys

from tests import cpu_devices

REPO = cpu_devices.REPO

NO_TF = ("import runpy, sys; sys.modules['tensorflow'] = None; "
         "sys.argv = ['bench_step.py'] + sys.argv[1:]; "
         "runpy.run_path('bench/bench_step.py', run_name='__main__')")


def test_bench_step_times_superclip_and_clip_without_tensorflow(tmp_path):
  out = tmp_path / "bench.json"
  r = subprocess.run(
      [sys.executable, "-c", NO_TF, "--config=configs/demo.py", "--steps=3", "--warmup=1",
       "--batch_per_device=16", f"--json_out={out}"],
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
