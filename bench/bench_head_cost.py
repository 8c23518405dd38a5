"""What SuperCLIP's head costs over CLIP, side by side in one run.

  python bench/bench_head_cost.py                        # B/16, batch 32, 5 timed steps each
  python bench/bench_head_cost.py --batch=8,32,64        # several batch sizes, one table
  python bench/bench_head_cost.py --variant=mu/16 --batch=32 --steps=5   # a quick look

For each batch size it reports:
  * forward FLOPs of SuperCLIP and CLIP from XLA's cost analysis of the compiled forward pass,
    and the head's share (the paper: ~0.08% for the towers of L/16; B/16's is 0.18%);
  * the same for the whole compiled train step (forward, backward and AdamW), and the step's
    temporary memory (`memory_analysis().temp_size_in_bytes`: what each step allocates anew);
  * the measured train-step time ratio SuperCLIP / CLIP on this machine: both steps are
    compiled first, then timed in alternation (ABAB...) so that machine noise hits both, and
    the medians are compared, in wall-clock time and in process CPU time (all threads; less
    sensitive to other processes on a shared machine). Target: <= 1.01.

What does not shrink with the batch is the head's 38M parameters (+25% at B/16): their
gradient, AdamW update and fresh gradient buffer cost the same per step whatever the batch, so
on a CPU the ratio falls as the batch grows; on accelerators per-chip batches are 64-256.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from superclip_jax import config_lib, sharding, train, train_state  # noqa: E402


def make_config(mode: str, variant: str, batch: int):
  c = config_lib.base_config()
  c.model.mode = mode
  c.model.variant = variant
  c.model.image_size = 224
  c.model.dtype = "float32"  # CPU
  c.input.batch_size = batch
  c.total_steps = 1000
  return c


def make_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, ctx = config.input.batch_size, config.model.context_length
  tokens = np.zeros((b, ctx), np.int32)
  for i in range(b):
    n = int(rng.integers(8, 30))
    tokens[i, 0], tokens[i, n] = 49406, 49407
    tokens[i, 1:n] = rng.integers(1, 49000, n - 1)
  s = config.model.image_size
  return {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "tokens": tokens,
          "class_tokens": tokens}


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def forward_flops(factory, config, batch) -> float:
  fwd = jax.jit(lambda p, x, t: factory.model.apply({"params": p}, x, t))
  return _flops(fwd.lower(factory.abstract.params, batch["image"], batch["tokens"]).compile())


def prepare(mode: str, variant: str, batch_size: int) -> dict:
  config = make_config(mode, variant, batch_size)
  mesh = sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  batch = jax.device_put(make_batch(config))
  state = factory.create()
  step = jax.jit(train.make_train_step(config, factory.model, factory.tx, factory.schedule),
                 donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  return {"forward_flops": forward_flops(factory, config, batch), "step_flops": _flops(compiled),
          "temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "step": compiled,
          "state": state, "batch": batch, "wall": [], "cpu": []}


def measure(variant: str, batch_size: int, steps: int) -> dict:
  runs = {mode: prepare(mode, variant, batch_size) for mode in ("superclip", "clip")}
  for _ in range(steps):  # alternate so both see the same machine noise
    for run in runs.values():
      wall, cpu = time.perf_counter(), time.process_time()
      run["state"], metrics = run["step"](run["state"], run["batch"])
      jax.block_until_ready(metrics)
      run["wall"].append(time.perf_counter() - wall)
      run["cpu"].append(time.process_time() - cpu)
  return runs


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="B/16")
  ap.add_argument("--batch", default="32", help="comma-separated batch sizes")
  ap.add_argument("--steps", type=int, default=5, help="timed steps per mode and batch")
  args = ap.parse_args()

  print(f"variant {args.variant}, {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"{args.steps} timed steps each (medians), float32")
  print("batch | fwd GFLOPs sc / clip | head share fwd | step share | temp MB sc / clip | "
        "step ms sc / clip | ratio wall | ratio cpu")
  for batch_size in (int(b) for b in args.batch.split(",")):
    runs = measure(args.variant, batch_size, args.steps)
    sc, cl = runs["superclip"], runs["clip"]
    ms = {k: 1e3 * statistics.median(r["wall"]) for k, r in runs.items()}
    cpu = {k: statistics.median(r["cpu"]) for k, r in runs.items()}
    print(f"{batch_size:5d} | {sc['forward_flops'] / 1e9:9.3f} / {cl['forward_flops'] / 1e9:9.3f}"
          f" | {100 * (sc['forward_flops'] / cl['forward_flops'] - 1):13.3f}%"
          f" | {100 * (sc['step_flops'] / cl['step_flops'] - 1):9.3f}%"
          f" | {sc['temp_bytes'] / 1e6:7.0f} / {cl['temp_bytes'] / 1e6:7.0f}"
          f" | {ms['superclip']:8.1f} / {ms['clip']:8.1f}"
          f" | {ms['superclip'] / ms['clip']:10.3f} | {cpu['superclip'] / cpu['clip']:9.3f}",
          flush=True)
    del runs
  print("target: ratio <= 1.01")


if __name__ == "__main__":
  main()
