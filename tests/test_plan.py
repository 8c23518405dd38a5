"""The TPU plan (issue 35): the train step compiled by the real TPU compiler for Cloud TPU slices,
on this CPU-only host. The compiling tests need libtpu (`pip install -e '.[tpu]'`, Python 3.12):
.ci/run's `tpu` leg installs it and runs this file; elsewhere they skip, saying so."""
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from superclip_jax import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not plan.tpu_compiler_available(),
                                  reason="libtpu is not installed: .ci/run's tpu leg runs this")


def demo_config(arg=None):
  sys.path.insert(0, REPO)
  from configs import demo
  return demo.get_config(arg)


# --- Everywhere (no compiler) -------------------------------------------------------------------


@pytest.mark.parametrize("name,compiler,chips", [
    ("v4-64", "v4:2x4x4", 32), ("v5p-128", "v5p:4x4x4", 64), ("v5litepod-256", "v5e:16x16", 256),
    ("v5litepod-8", "v5e:2x4", 8), ("v6e-256", "v6e:16x16", 256), ("v5e:2x2", "v5e:2x2", 4),
    ("V5P-8", "v5p:2x2x1", 4)])
def test_gcloud_and_compiler_names_map_to_one_slice(name, compiler, chips):
  """gcloud counts TensorCores for v4 and v5p (two a chip) and chips for v5e and v6e
  (cloud.google.com/tpu/docs/v5p: v5p-128 is 4x4x4, 64 chips)."""
  t = plan.parse_topology(name)
  assert (t.compiler_name, t.chips) == (compiler, chips)
  assert plan.parse_topology(t.gcloud_name) == t


def test_an_unknown_topology_is_an_error_listing_the_known_ones():
  with pytest.raises(ValueError, match=r"'v5p-100'.*v5litepod-256.*v5p-128.*v5e:16x16"):
    plan.parse_topology("v5p-100")
  with pytest.raises(ValueError, match="--slices=0"):
    plan.parse_topology("v5p-8", slices=0)


def test_batch_search_finds_the_largest_fit_in_few_compiles():
  """Against brute force over a memory curve that is linear plus a step (as XLA's temporaries
  can jump where a layout changes)."""
  def memory(b):
    return 1000 + 37 * b + (500 if b > 300 else 0)

  for hbm in (1500, 9000, 12345, 14000, 40000):
    calls = []

    def compile_at(b):
      calls.append(b)
      return {"batch_per_chip": b, "total_bytes": memory(b)}

    best, _ = plan.search_batch(compile_at, hbm, start=8, step=8)
    truth = max((b for b in range(8, 1 << 16, 8) if memory(b) <= hbm), default=None)
    assert best == truth, hbm
    assert len(calls) <= 12, calls
    assert len(set(calls)) == len(calls)  # no batch compiled twice


def test_without_libtpu_the_command_says_what_to_install(tmp_path):
  if plan.tpu_compiler_available():
    pytest.skip("libtpu is installed here; the other legs check its absence")
  r = subprocess.run([sys.executable, "-m", "superclip_jax.plan", "--config=configs/demo.py",
                      "--topology=v5e:2x2"], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      "Error: the TPU compiler is not installed: pip install -e '.[tpu]' (jax[tpu], with "
      "libtpu; Python 3.12 for jax >= 0.11)")


# --- With the TPU compiler ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_plan():
  return plan.plan(demo_config(), plan.parse_topology("v5e:2x2"), say=lambda _: None)


@needs_libtpu
def test_no_tpu_is_present():
  assert jax.default_backend() == "cpu" and all(d.platform == "cpu" for d in jax.devices())


@needs_libtpu
@pytest.mark.parametrize("name,hosts", [("v5p-128", 16), ("v4-64", 8), ("v4-8", 1),
                                        ("v5litepod-256", 32), ("v5litepod-16", 2),
                                        ("v5litepod-8", 1), ("v6e-256", 32)])
def test_the_compilers_slices_have_googles_chip_and_host_counts(name, hosts):
  """Chips and hosts of each slice as cloud.google.com/tpu/docs lists them (docs/v5p: 4x4x4 is
  64 chips on 16 hosts; docs/v5e: 16x16 is 32 hosts, 4x4 two, 2x4 one), a device a chip."""
  t = plan.parse_topology(name)
  devices = plan.topology_devices(t)
  assert len(devices) == t.chips
  assert len({d.process_index for d in devices}) == hosts
  assert len({tuple(d.coords) for d in devices}) == t.chips  # megacore: no device per core


@needs_libtpu
def test_the_demo_compiles_for_v5e_and_its_memory_adds_up(demo_plan):
  r = demo_plan
  assert r["chips"] == 4 and r["batch_per_chip"] == 4 and r["fits"]
  # The compiler's argument size is the per-chip shards of the state and the batch, as the
  # shardings say (computed apart from the compiler), plus the padding of TPU's tiled layouts
  # (a float32 array's last two dimensions are stored in 8x128 tiles: biases, LayerNorm scales).
  shards = r["params_bytes"] + r["opt_state_bytes"] + r["other_state_bytes"] + r["batch_bytes"]
  assert shards <= r["argument_bytes"] <= 1.05 * shards
  assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                              + r["temp_bytes"])
  assert r["alias_bytes"] > 0.9 * (r["params_bytes"] + r["opt_state_bytes"])  # donated
  # FLOPs: training's model count per chip; the TPU compiler's own count of the partitioned
  # program (unrolled, no remat) holds those matmuls and the elementwise work besides, which in
  # a model this small is half as much again (at B/16 the two agree within 2%).
  from superclip_jax import mfu
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
           for k, v in plan.abstract_batch(demo_config(), 16, _mesh()).items()}
  assert r["model_tflops_per_chip"] == pytest.approx(
      mfu.model_flops_per_step(demo_config(), batch) / 4 / 1e12)
  assert r["model_tflops_per_chip"] < r["compiler_tflops_per_chip"] < 2 * r["model_tflops_per_chip"]
  assert set(r["evals"]) == {"zeroshot", "retrieval"}
  assert all(e["text"] and e["total_bytes"] > 0 for e in r["evals"].values())
  table = plan.table(r, plan.parse_topology("v5e:2x2"))
  assert "| total (GiB/chip) |" in table and "of 16 GiB HBM: fits" in table


def _mesh():
  from superclip_jax import sharding
  return sharding.make_mesh(demo_config().mesh, jax.devices()[:1])


@needs_libtpu
def test_two_slices_split_data_across_them():
  r = plan.plan(demo_config(), plan.parse_topology("v5e:2x2", slices=2), with_evals=False,
                say=lambda _: None)
  assert r["chips"] == 8 and r["slices"] == 2 and r["batch_per_chip"] == 2 and r["fits"]
  assert r["mesh"] == {"data": 8, "fsdp": 1}


@needs_libtpu
def test_a_batch_that_cannot_fit_is_refused_with_its_numbers(tmp_path):
  out = tmp_path / "plan.json"
  r = subprocess.run([sys.executable, "-m", "superclip_jax.plan", "--config=configs/demo.py",
                      "--topology=v5litepod-4", "--batch_per_chip=65536", "--noevals",
                      f"--json_out={out}"], cwd=REPO, capture_output=True, text=True,
                     timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2, r.stderr[-3000:]
  result = json.loads(r.stdout.splitlines()[0])
  assert result == json.loads(out.read_text())
  # The TPU compiler itself refuses a step larger than the chip: its figures, in GiB, are the
  # plan's (v5e: 16 GiB of HBM, of which the runtime keeps a little).
  assert not result["fits"] and not result["compiled"]
  assert 15 * plan.GIB < result["available_bytes"] <= 16 * plan.GIB < result["temp_bytes"]
  assert "HBM" in result["refusal"]
  need, have = (f"{result[k] / plan.GIB:.2f}" for k in ("temp_bytes", "available_bytes"))
  assert (f"does NOT fit: the TPU compiler refused the step, HLO temporaries need {need}, "
          f"{have} available") in r.stdout


def test_the_compilers_refusal_is_read_as_numbers():
  """The message of jaxlib 0.12's CompileTimeHbmOom, as the compiler printed it here."""
  e = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the "
                   "total memory required for HLO temporaries (234.35G) exceeds available HBM "
                   "(15.75G). HLO module: jit_train_step.\nSee https://openxla.org/xla/errors")
  r = plan.hbm_refusal(e)
  assert (r["what"], r["needed_bytes"], r["available_bytes"]) == (
      "HLO temporaries", int(234.35 * 2**30), int(15.75 * 2**30))
  assert r["message"].startswith("E1000: CompileTimeHbmOom: Ran out of memory on HBM")
  assert plan.hbm_refusal(ValueError("RESOURCE_EXHAUSTED: host memory")) is None


# --- launch/tpu.py plans the slice before it asks for one ----------------------------------------

LAUNCH = [sys.executable, os.path.join(REPO, "launch", "tpu.py"), "--name=clip",
          "--zone=us-east5-a"]


def _no_gcloud(tmp_path):
  """PATH with a `gcloud` that only records that it was called."""
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "gcloud").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\nexit 1\n")
  (fake / "gcloud").chmod(0o755)
  return dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")


@needs_libtpu
def test_launch_refuses_a_slice_the_config_does_not_fit_before_any_gcloud_call(tmp_path):
  r = subprocess.run([*LAUNCH, "watch", "--accelerator-type=v5litepod-4", "--spot",
                      "--config=configs/demo.py", "--workdir=gs://bucket/run", "--",
                      "--config.input.batch_size=262144", "--config.evals={}"],
                     cwd=REPO, capture_output=True, text=True, timeout=600,
                     env=_no_gcloud(tmp_path))
  assert r.returncode == 1, r.stderr
  assert re.fullmatch(
      r"launch/tpu.py: configs/demo.py does not fit v5litepod-4: the TPU compiler refused its "
      r"train step: HLO temporaries need (\d+\.\d\d) GiB per chip, 15\.\d\d GiB available at "
      r"65536 pairs per chip; shard more .* \(--skip-plan creates it anyway\)",
      r.stderr.strip().splitlines()[-1])
  assert not (tmp_path / "calls").exists()  # nothing was asked of the cloud


@needs_libtpu
def test_launch_dry_run_prints_the_plan_before_the_create_command(tmp_path):
  r = subprocess.run([*LAUNCH, "--dry-run", "create", "--accelerator-type=v5litepod-4",
                      "--config=configs/demo.py"], cwd=REPO, capture_output=True, text=True,
                     timeout=600, env=_no_gcloud(tmp_path))
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  fits = next(i for i, x in enumerate(lines) if x.startswith("# plan: configs/demo.py fits "
                                                              "v5litepod-4: "))
  assert any(x.startswith("# | total (GiB/chip) | ") and "GiB HBM: fits" in x
             for x in lines[:fits])
  create = next(i for i, x in enumerate(lines) if " queued-resources create clip " in x)
  assert fits < create and "--accelerator-type=v5litepod-4" in lines[create]


def test_launch_without_the_compiler_says_so_and_creates_nothing(tmp_path):
  if plan.tpu_compiler_available():
    pytest.skip("libtpu is installed here; the other legs check its absence")
  env = _no_gcloud(tmp_path)
  args = ["create", "--accelerator-type=v5litepod-4", "--config=configs/demo.py"]
  r = subprocess.run([*LAUNCH, "--dry-run", *args], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=env)
  assert r.returncode == 0 and "# not planned: Error: the TPU compiler is not installed" in r.stdout
  r = subprocess.run([*LAUNCH, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                     env=env)
  assert r.returncode == 1 and r.stderr.strip().endswith(
      "(install the plan's compiler here: pip install -e '.[tpu]', Python 3.12); --skip-plan "
      "creates the slice without the check")
  assert not (tmp_path / "calls").exists()
