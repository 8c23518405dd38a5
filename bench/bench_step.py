"""Times the full train step of any config on synthetic device-resident batches: every backend.

    python bench/bench_step.py --config=configs/demo.py --steps=3          # CPU smoke test
    python bench/bench_step.py --config=configs/b16.py --batch_per_device=256 \
        --config.model.attention=cudnn --json_out=/tmp/b16.json           # an accelerator

Both towers, the head, the losses and the optimizer update, as `superclip_jax.main` runs them,
for SuperCLIP and CLIP (`--modes`), whose steps alternate so that both see the same machine.
No TensorFlow is imported: this runs where only jax, flax, optax and ml_collections are.
Prints one markdown table and one JSON line: img/s per device, step ms (median of --steps
after --warmup, each step synchronised; min-max beside it), model TFLOP/s per device, MFU
against a bf16/f32 matmul peak measured on the same device in the same run (and against the
data-sheet peak where the chip is in `mfu.PEAK_TFLOPS`), peak memory, compile seconds, and
the SuperCLIP / CLIP step-time ratio.

`--compare=bigvision --bigvision_path=CHECKOUT` (CPU, float32) also times big_vision's
two-towers CLIP at the config's sizes, alternating with ours, and prints our / its step time
over the pairs (median and interquartile range) with the FLOPs and parameter ratios that show
the two do the same work (bench/bigvision_compare.py; it imports TensorFlow, which big_vision
needs).
"""
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (get_config).",
                                lock_config=False)
flags.DEFINE_integer("batch_per_device", 0, "Rows per device (0: the config's global batch "
                     "over the devices).")
flags.DEFINE_integer("steps", 10, "Timed steps per mode.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per mode after compiling.")
flags.DEFINE_list("modes", ["superclip", "clip"], "model.mode values to time side by side.")
flags.DEFINE_string("json_out", "", "Also write the results here (JSON).")
flags.DEFINE_enum("compare", "", ["", "bigvision"],
                  "Also time another codebase's CLIP at the config's sizes, alternating with "
                  "ours: 'bigvision' (CPU, float32; needs --bigvision_path; "
                  "bench/bigvision_compare.py).")
flags.DEFINE_string("bigvision_path", "", "A big_vision checkout (the folder that holds "
                    "big_vision/models/), for --compare=bigvision.")
FLAGS = flags.FLAGS


def synthetic_batch(config, rng):
  import numpy as np  # pylint: disable=import-outside-toplevel
  b, ctx, s = config.input.batch_size, config.model.context_length, config.model.image_size
  lengths = rng.integers(5, ctx - 1, b)
  tokens = np.zeros((b, ctx), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, 0], tokens[i, 1:n], tokens[i, n] = 49406, rng.integers(1, 49000, n - 1), 49407
  return {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "tokens": tokens,
          "class_tokens": tokens}


def prepare(config, mode: str, mesh) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from superclip_jax import mfu, sharding, train_state, train_step  # pylint: disable=import-outside-toplevel
  config = copy.deepcopy(config)
  config.model.mode = mode
  factory = train_state.StateFactory(config, mesh)
  host = synthetic_batch(config, np.random.default_rng(0))
  batch = jax.device_put(host, sharding.batch_sharding(mesh))
  state = factory.create()
  step = train_step.jit_train_step(config, factory)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  flops = mfu.model_flops_per_step(
      config, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()})
  return {"mode": mode, "config": config, "step": compiled, "state": state, "batch": batch,
          "compile_s": compile_s, "flops": flops, "times": [],
          "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params))}


def run_step(run: dict) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  run["state"], metrics = run["step"](run["state"], run["batch"])
  jax.block_until_ready((run["state"], metrics))
  return time.perf_counter() - start


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from superclip_jax import attention, config_lib, mfu, sharding, versions  # pylint: disable=import-outside-toplevel

  config = FLAGS.config
  mesh = sharding.make_mesh(config.mesh)
  if FLAGS.batch_per_device:
    config.input.batch_size = FLAGS.batch_per_device * mesh.size
  config.accum_steps = config.get("accum_steps", 1)
  config.input.data = "demo"  # the bench feeds synthetic batches; no data is read
  config.evals = ml_collections.ConfigDict()  # nor evaluates: the paper evals' data may be unset
  config_lib.validate(config)
  if FLAGS.compare == "bigvision":  # before any compiling: a wrong path or dtype fails at once
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bigvision_compare  # pylint: disable=import-outside-toplevel
    two_towers = bigvision_compare.check(config, FLAGS.bigvision_path)
  info = versions.collect()
  print(versions.summary(info), flush=True)
  dtype = jnp.dtype(config.model.dtype)
  measured_peak = mfu.measured_peak_tflops(dtype)
  table_peak = mfu.table_peak_tflops(jax.devices()[0].device_kind, dtype)
  runs = []
  for mode in FLAGS.modes:
    print(f"compiling {mode} ...", flush=True)
    runs.append(prepare(config, mode, mesh))
  if FLAGS.compare == "bigvision":
    print("compiling big_vision's two towers ...", flush=True)
    runs.append(bigvision_compare.prepare(config, runs[0]["batch"], two_towers))
  for run in runs:
    for _ in range(FLAGS.warmup):
      run_step(run)
  for i in range(FLAGS.steps):  # alternate ABBA so that drift in machine speed is shared
    for run in (runs if i % 2 == 0 else runs[::-1]):
      run["times"].append(run_step(run))
  # Measured again after the timing, and the larger kept: one 50 ms measurement taken while
  # something else briefly held the cores would otherwise understate the peak for the run.
  measured_peak = max(measured_peak, mfu.measured_peak_tflops(dtype))
  peak_memory, memory_source = mfu.peak_memory_bytes(runs[0]["step"])
  impl = attention.resolve(config.model.get("attention", "auto"), dtype,
                           _head_dim(config))
  results = []
  for run in runs:
    step_s = statistics.median(run["times"])
    tflops = run["flops"] / step_s / mesh.size / 1e12
    results.append({
        "mode": run["mode"], "variant": config.model.variant,
        "attention": run.get("attention", impl),
        "dtype": dtype.name, "global_batch": config.input.batch_size, "devices": mesh.size,
        "img_per_sec_per_device": config.input.batch_size / step_s / mesh.size,
        "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * min(run["times"]),
        "step_ms_max": 1e3 * max(run["times"]), "tflops_per_device": tflops,
        "mfu_measured_peak": tflops / measured_peak,
        "mfu_table_peak": tflops / table_peak if table_peak else None,
        "compile_s": run["compile_s"], "model_gflops_per_step": run["flops"] / 1e9,
        "params": run["params"]})
  out = {"versions": info, "measured_peak_tflops": measured_peak, "table_peak_tflops": table_peak,
         "peak_memory_bytes": peak_memory, "memory_source": memory_source, "runs": results}
  if len(FLAGS.modes) == 2:
    out["ratio_step_time"] = results[0]["step_ms"] / results[1]["step_ms"]
  if FLAGS.compare:
    other = runs[-1]
    out["compare"] = {"codebase": other["mode"], "ours": [
        {"mode": run["mode"], **pair_ratios(run["times"], other["times"]),
         "flops_ratio": run["flops"] / other["flops"],
         "params_ratio": run["params"] / other["params"]} for run in runs[:-1]]}
  print(markdown(out))
  print(json.dumps(out))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(out, f, indent=2)
  if FLAGS.compare:  # big_vision's utils import tensorflow.io.gfile
    return
  loaded = [m for m in sys.modules if m.split(".")[0] == "tensorflow" and sys.modules[m]]
  assert not loaded, f"the step's import path loaded TensorFlow: {loaded[:5]}"


def pair_ratios(ours: list, theirs: list) -> dict:
  """Step-time ratio ours / theirs over the alternated pairs (step i of each): the median,
  the interquartile range and the number of pairs."""
  ratios = sorted(a / b for a, b in zip(ours, theirs))
  q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
  return {"ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2],
          "pairs": len(ratios)}


def _head_dim(config) -> int:
  from superclip_jax import models  # pylint: disable=import-outside-toplevel
  size = models.VIT_SIZES[models.parse_variant(config.model.variant)[0]]
  return size.width // size.heads


def markdown(out: dict) -> str:
  rows = ["| mode | variant | attention | dtype | batch/device | img/s/device | step ms "
          "(min-max) | TFLOP/s/device | MFU (measured peak) | MFU (data sheet) | compile s |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in out["runs"]:
    sheet = f"{100 * r['mfu_table_peak']:.1f}%" if r["mfu_table_peak"] else "n/a"
    rows.append(
        f"| {r['mode']} | {r['variant']} | {r['attention']} | {r['dtype']} | "
        f"{r['global_batch'] // r['devices']} | {r['img_per_sec_per_device']:.1f} | "
        f"{r['step_ms']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | "
        f"{r['tflops_per_device']:.3g} | {100 * r['mfu_measured_peak']:.1f}% | {sheet} | "
        f"{r['compile_s']:.1f} |")
  memory = out["peak_memory_bytes"]
  rows.append(f"\nmatmul peak measured: {out['measured_peak_tflops']:.4g} TFLOP/s per device; "
              f"peak memory ({out['memory_source']}): "
              f"{'n/a' if memory is None else f'{memory / 2**30:.2f} GiB'}")
  if "ratio_step_time" in out:
    rows.append(f"step time {out['runs'][0]['mode']} / {out['runs'][1]['mode']}: "
                f"{out['ratio_step_time']:.3f}")
  for r in out.get("compare", {}).get("ours", []):
    rows.append(f"step time {r['mode']} / {out['compare']['codebase']}: "
                f"{r['ratio_median']:.3f} (IQR {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}, "
                f"{r['pairs']} alternated pairs); FLOPs {r['mode']} / "
                f"{out['compare']['codebase']}: {r['flops_ratio']:.3f}, parameters: "
                f"{r['params_ratio']:.3f}")
  return "\n".join(rows)


if __name__ == "__main__":
  app.run(main)
