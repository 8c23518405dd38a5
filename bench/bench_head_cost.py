"""What SuperCLIP's head costs over CLIP, side by side in one run.

  python bench/bench_head_cost.py                  # B/16, batch 8, 7 timed steps each
  python bench/bench_head_cost.py --variant=mu/16 --batch=32 --steps=5   # a quick look

Reports:
  * forward FLOPs of SuperCLIP and CLIP from XLA's cost analysis of the compiled forward pass,
    and the head's share (the paper: ~0.08% for the vision + text towers of L/16);
  * the measured train-step time ratio SuperCLIP / CLIP on this machine: both steps are
    compiled first, then timed in alternation (ABAB...) so that machine noise hits both, and
    the medians are compared. Target: <= 1.01.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from superclip_jax import config_lib, sharding, train, train_state


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


def forward_flops(factory, config, batch) -> float:
  params = factory.abstract.params
  fwd = jax.jit(lambda p, x, t: factory.model.apply({"params": p}, x, t))
  compiled = fwd.lower(params, batch["image"], batch["tokens"]).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="B/16")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=7)
  args = ap.parse_args()

  runs = {}
  for mode in ("superclip", "clip"):
    config = make_config(mode, args.variant, args.batch)
    mesh = sharding.make_mesh(config.mesh)
    factory = train_state.StateFactory(config, mesh)
    batch = jax.device_put(make_batch(config))
    step = jax.jit(train.make_train_step(config, factory.model, factory.tx, factory.schedule),
                   donate_argnums=0)
    state = factory.create()
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    runs[mode] = {"flops": forward_flops(factory, config, batch), "step": step,
                  "state": state, "batch": batch, "times": []}

  for _ in range(args.steps):  # alternate so both see the same machine noise
    for run in runs.values():
      t0 = time.perf_counter()
      run["state"], metrics = run["step"](run["state"], run["batch"])
      jax.block_until_ready(metrics)
      run["times"].append(time.perf_counter() - t0)

  sc, cl = runs["superclip"], runs["clip"]
  print(f"variant {args.variant}, batch {args.batch}, {jax.devices()[0].platform}, "
        f"{args.steps} timed steps each (medians)")
  print(f"forward GFLOPs   superclip {sc['flops'] / 1e9:10.3f}   clip {cl['flops'] / 1e9:10.3f}")
  print(f"head share of forward FLOPs: {100 * (sc['flops'] / cl['flops'] - 1):.3f}%")
  ms = {k: 1e3 * statistics.median(r["times"]) for k, r in runs.items()}
  print(f"train step ms    superclip {ms['superclip']:10.1f}   clip {ms['clip']:10.1f}")
  print(f"step time ratio superclip/clip: {ms['superclip'] / ms['clip']:.3f} (target <= 1.01)")


if __name__ == "__main__":
  main()
