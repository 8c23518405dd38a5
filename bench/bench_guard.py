"""What the train step's check of its updated parameters costs (docs/training.md, NaN/Inf).

  python bench/bench_guard.py                         # S/16, 224 px, batch 8, 8 pairs (~3 min)
  python bench/bench_guard.py --variant=mu/8 --image_size=32 --batch=8 --pairs=20   # quick

The step with the check (`train_step(check_update=True)`, what training runs) and without it
are compiled from the same state factory and timed in alternation (ABAB..., so that machine
noise hits both alike). Prints each compiled step's temporaries and arguments
(`memory_analysis()`, exact) and the per-pair step-time ratio with / without: its median and
interquartile range.
"""
import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from superclip_jax import config_lib, sharding, train_state, train_step  # noqa: E402


def make_config(variant: str, image_size: int, batch: int):
  c = config_lib.base_config()
  c.model.variant, c.model.image_size, c.model.dtype = variant, image_size, "float32"
  c.input.batch_size, c.lr, c.schedule.warmup_steps = batch, 1e-3, 2
  return c


def make_batch(config, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b, ctx, s = config.input.batch_size, config.model.context_length, config.model.image_size
  tokens = np.zeros((b, ctx), np.int32)
  tokens[:, 0], tokens[:, 1:9], tokens[:, 9] = 49406, rng.integers(1, 5000, (b, 8)), 49407
  return {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "tokens": tokens,
          "class_tokens": tokens}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="S/16")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--pairs", type=int, default=8, help="timed (with, without) pairs")
  args = ap.parse_args()
  config = make_config(args.variant, args.image_size, args.batch)
  mesh = sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  batch = make_batch(config)
  steps, states = {}, {}
  for name, check in (("with", True), ("without", False)):
    step = functools.partial(train_step.make_train_step(config, factory.model, factory.tx,
                                                        factory.schedule), check_update=check)
    start = time.perf_counter()
    steps[name] = jax.jit(step, donate_argnums=0).lower(factory.create(), batch).compile()
    m = steps[name].memory_analysis()
    print(f"{name:7s} check: compiled in {time.perf_counter() - start:5.1f} s, temporaries "
          f"{m.temp_size_in_bytes / 1e6:8.1f} MB, arguments {m.argument_size_in_bytes / 1e6:8.1f}"
          " MB", flush=True)
    states[name] = factory.create()
  times = {name: [] for name in steps}
  for i in range(args.pairs + 1):  # the first pair warms up
    for name in (("with", "without") if i % 2 else ("without", "with")):
      start = time.perf_counter()
      states[name], metrics = steps[name](states[name], batch)
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
  ratios = [a / b for a, b in zip(times["with"][1:], times["without"][1:])]
  q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
  print(f"{args.variant} batch {args.batch}, {jax.devices()[0].platform}: step "
        f"{1e3 * statistics.median(times['with'][1:]):.1f} ms with the check, "
        f"{1e3 * statistics.median(times['without'][1:]):.1f} ms without; with / without "
        f"{statistics.median(ratios):.3f} (IQR {q1:.3f}-{q3:.3f}, {len(ratios)} pairs)")


if __name__ == "__main__":
  main()
