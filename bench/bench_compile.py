"""Compile time of the train step with scanned vs unrolled transformer layers, side by side.

  python bench/bench_compile.py                      # B/16, batch 8, 3 repetitions each
  python bench/bench_compile.py --variant=S/16 --reps=5 --remat_policy=full

Each repetition builds a fresh train step (new closure, so nothing is reused from a cache),
traces and lowers it on abstract inputs (`lower`), then compiles it (`compile`); unrolled and
scanned alternate (ABAB...) so machine noise hits both. Prints the medians and the ratio
unrolled / scanned of lower + compile.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from superclip_jax import config_lib, sharding, train_state, train_step


def make_config(variant: str, batch: int, scan_layers: bool, remat_policy: str):
  c = config_lib.base_config()
  c.model.variant = variant
  c.model.dtype = "float32"  # CPU
  c.model.scan_layers = scan_layers
  c.model.remat_policy = remat_policy
  c.input.batch_size = batch
  c.total_steps = 1000
  return c


def time_compile(config) -> tuple[float, float]:
  """(seconds to trace + lower, seconds to compile) of a fresh train step for `config`."""
  mesh = sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  m = config.model
  b = config.input.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, m.image_size, m.image_size, 3), jnp.float32),
           "tokens": jax.ShapeDtypeStruct((b, m.context_length), jnp.int32),
           "class_tokens": jax.ShapeDtypeStruct((b, m.context_length), jnp.int32)}
  step = jax.jit(train_step.make_train_step(config, factory.model, factory.tx, factory.schedule),
                 donate_argnums=0)
  t0 = time.perf_counter()
  lowered = step.lower(factory.abstract, batch)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="B/16")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--remat_policy", default="none")
  args = ap.parse_args()

  times = {False: [], True: []}
  for rep in range(args.reps):
    for scan in (False, True):
      lower, comp = time_compile(make_config(args.variant, args.batch, scan, args.remat_policy))
      times[scan].append((lower, comp))
      print(f"rep {rep} {'scanned' if scan else 'unrolled'}: lower {lower:.1f} s, "
            f"compile {comp:.1f} s", flush=True)
  med = {scan: [statistics.median(t[i] for t in times[scan]) for i in (0, 1)]
         for scan in times}
  for scan, (lower, comp) in med.items():
    print(f"{'scanned ' if scan else 'unrolled'} (median of {args.reps}): lower {lower:.1f} s, "
          f"compile {comp:.1f} s, total {lower + comp:.1f} s")
  print(f"{args.variant} train step, remat_policy={args.remat_policy}: unrolled / scanned = "
        f"{sum(med[False]) / sum(med[True]):.2f}x (lower + compile), "
        f"{med[False][1] / med[True][1]:.2f}x (compile only)")


if __name__ == "__main__":
  main()
