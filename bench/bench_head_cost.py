"""What SuperCLIP's head costs over CLIP, side by side in one run.

  python bench/bench_head_cost.py                  # B/16, batch 64, 12 timed steps (~25 min)
  python bench/bench_head_cost.py --batch=32,64    # several batch sizes, one table
  python bench/bench_head_cost.py --variant=mu/16 --batch=32 --steps=5   # a quick look
  python bench/bench_head_cost.py --malloc=system  # glibc's default malloc (see below)
  python bench/bench_head_cost.py --no-scan --remat=none --batch=16   # unrolled, no remat

The default is the paper's training setup on one CPU host: B/16 at 224 px, float32 (CPU),
gradient checkpointing (`--remat=full`, as the official recipe) over scanned layers (the
trainer's fast-compiling option; with full remat the step's temporaries are 3.7 GB at batch
64 instead of ~23 GB unrolled, which two models in one process on a 24 GB host cannot hold).

For each batch size it reports:
  * forward FLOPs of SuperCLIP and CLIP from XLA's cost analysis of the compiled forward pass,
    and the head's share (the paper: ~0.08% for the towers of L/16; B/16's is 0.18%), always
    of the unrolled model;
  * the same for the whole compiled train step (forward, backward and AdamW; not with `--scan`,
    where XLA's cost analysis counts the while-loop body once, not once per layer), and the
    step's temporary memory (`memory_analysis().temp_size_in_bytes`: what each step
    allocates anew);
  * the measured train-step time ratio SuperCLIP / CLIP on this machine: both steps are
    compiled first, then timed in alternation (ABBA...; `--first` picks which model is built
    and allocated first) so that machine noise and order hit both alike, and the medians are
    compared, in wall-clock time and in process CPU time (all threads; less sensitive to other
    processes on a shared machine). Every pair is printed as it completes, with an ETA, and
    every step's time at the end. Target: <= 1.01;
  * the same ratio taken step by step (SuperCLIP's step i over CLIP's step i, which ran next to
    it), its median with a distribution-free 95% confidence interval (6+ steps), whether that
    interval shows the target, and how many steps a +-0.5% interval would take at this spread;
  * the head's own work compiled alone (forward and backward from the pooled patch tokens,
    targets, IDF, loss, gradient norm, AdamW on its parameters; median of 10) as a share of
    the CLIP step: what the ratio would be if the costs simply add. On the 2-core VMs here
    single B/16 steps vary by +-5-10%, so the full-step ratio from 5-8 steps moves by a few
    percent between runs; this cross-check does not.

First it measures the host's own speed noise (`--probe` seconds of a fixed loop; 0 skips):
the rate of a loop that does the same work every time, in 0.25 s windows. Where that swings by
tens of percent (the shared 2-core VMs this project runs on: 0.5-1.6x of the median from one
second to the next, independently on each core), no number of steps that fits a session
resolves 1%; run it on a quiet dedicated host or an accelerator.

The head's 38M parameters (+25% at B/16) cost the same AdamW update whatever the batch, so on a
CPU the ratio falls as the batch grows; on accelerators per-chip batches are 64-256.

`--malloc=tuned` (the default; the trainer's opt-in `SUPERCLIP_JAX_MALLOC=tuned`) runs with the
glibc settings of `superclip_jax/host_malloc.py`, under which a step's temporaries are reused
instead of being page-faulted in afresh every step; `--malloc=system` leaves glibc's defaults
(each step then faults in its multi-GB temporaries, a third of the step on these VMs, and more
for SuperCLIP, whose temporaries are larger). The page faults per step are reported either way.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from superclip_jax import config_lib, host_malloc, models, sharding, train_step  # noqa: E402
from superclip_jax import train_state  # noqa: E402


def make_config(mode: str, variant: str, batch: int, remat: str = "none", scan: bool = False):
  c = config_lib.base_config()
  c.model.remat_policy = remat
  c.model.scan_layers = scan
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


def forward_flops(mode: str, variant: str, batch) -> float:
  """FLOPs of the compiled forward pass, always of the unrolled model: XLA's cost analysis
  counts a scanned (while-loop) body once, not once per layer."""
  model = models.model_from_config(make_config(mode, variant, len(batch["image"])).model)
  params = jax.eval_shape(model.init, jax.random.key(0), batch["image"], batch["tokens"])
  fwd = jax.jit(lambda p, x, t: model.apply(p, x, t))
  return _flops(fwd.lower(params, batch["image"], batch["tokens"]).compile())


def prepare(mode: str, variant: str, batch_size: int, remat: str = "none",
            scan: bool = False) -> dict:
  config = make_config(mode, variant, batch_size, remat, scan)
  mesh = sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  batch = jax.device_put(make_batch(config))
  state = factory.create()
  step = jax.jit(train_step.make_train_step(config, factory.model, factory.tx, factory.schedule),
                 donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  return {"forward_flops": forward_flops(mode, variant, batch),
          "step_flops": None if scan else _flops(compiled),
          "temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "step": compiled,
          "state": state, "batch": batch, "wall": [], "cpu": [], "faults": []}


def head_alone_ms(superclip: dict, reps: int = 10) -> float:
  """The head's own train-step work, compiled alone: its forward and backward from the pooled
  patch tokens (with the gradient into them), multi-hot targets, IDF counts and weights, the
  loss, and the gradient norm and AdamW update of its parameters. Median ms of `reps`: a
  cross-check of the full steps' ratio with far less noise (100 ms, not 10 s, per sample)."""
  import optax  # pylint: disable=import-outside-toplevel
  from superclip_jax import losses, models  # pylint: disable=import-outside-toplevel
  params = superclip["state"].params["class_head"]
  width, vocab = params["dense"]["kernel"].shape
  head = models.ClassHead(vocab)
  tokens = superclip["batch"]["class_tokens"]
  pooled = jax.random.normal(jax.random.PRNGKey(0), (tokens.shape[0], width))
  tx = optax.adamw(1e-3, 0.9, 0.98, 1e-6, weight_decay=0.2)

  def step(params, opt_state, counts, pooled, tokens):
    targets = losses.multi_hot(tokens, vocab)
    counts = counts + targets.sum(0)
    idf = losses.idf_weights(counts, 1.0 + tokens.shape[0])
    loss_fn = lambda p, x: losses.idf_class_loss(head.apply({"params": p}, x), targets, idf)
    loss, (grads, d_pooled) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, pooled)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, counts, loss,
            optax.tree.norm(grads), d_pooled)

  params = jax.tree.map(jax.numpy.array, params)  # a copy: the run's state is donated later
  args = [params, tx.init(params), jax.numpy.zeros((vocab,))]
  fn = jax.jit(step, donate_argnums=(0, 1, 2))
  times = []
  for i in range(reps + 1):
    start = time.perf_counter()
    *args, loss, _, _ = fn(*args, pooled, tokens)
    jax.block_until_ready(loss)
    if i:  # the first call compiles
      times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def median_ci(xs, level: float = 0.95):
  """A distribution-free confidence interval for the median of `xs`: the order statistics
  x_(k), x_(n+1-k) with P(Binomial(n, 1/2) < k) <= (1 - level) / 2. None below 6 samples."""
  xs, n = sorted(xs), len(xs)
  below = lambda k: sum(math.comb(n, i) for i in range(k)) / 2 ** n  # P(Binomial < k)
  k = 0
  while below(k + 1) <= (1 - level) / 2:
    k += 1
  return (xs[k - 1], xs[n - k]) if k else None


def host_speed(seconds: float = 20.0, window: float = 0.25) -> list[float]:
  """This machine's own speed over time: a fixed pure-Python loop's rate in `window`-second
  slices, relative to its median. On a quiet dedicated host these sit within a few percent of
  1; on the shared VMs here they swing between ~0.5 and ~1.5 from one second to the next (no
  PMU under virtualization to count cycles instead), which is what bounds the step ratio."""
  rates = []
  for _ in range(int(seconds / window)):
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < window:
      n += 1
    rates.append(n)
  mid = statistics.median(rates)
  return [r / mid for r in rates]


def measure(variant: str, batch_size: int, steps: int, remat: str = "none",
            scan: bool = False, first: str = "superclip") -> dict:
  modes = (first, ({"superclip", "clip"} - {first}).pop())
  runs = {mode: prepare(mode, variant, batch_size, remat, scan) for mode in modes}
  start = time.perf_counter()
  for i in range(steps):  # alternate, ABBA, so that both see the same machine noise and order
    for mode in (modes if i % 2 == 0 else modes[::-1]):
      run = runs[mode]
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      wall, cpu = time.perf_counter(), time.process_time()
      run["state"], metrics = run["step"](run["state"], run["batch"])
      jax.block_until_ready(metrics)
      run["wall"].append(time.perf_counter() - wall)
      run["cpu"].append(time.process_time() - cpu)
      run["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    elapsed = time.perf_counter() - start
    sc, cl = runs["superclip"]["wall"][-1], runs["clip"]["wall"][-1]
    print(f"      pair {i + 1}/{steps}: {sc:.2f} / {cl:.2f} s = {sc / cl:.3f}, "
          f"ETA {elapsed / (i + 1) * (steps - i - 1) / 60:.0f} min", flush=True)
  return runs


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="B/16")
  ap.add_argument("--batch", default="64", help="comma-separated batch sizes")
  ap.add_argument("--steps", type=int, default=12, help="timed steps per mode and batch")
  ap.add_argument("--remat", default="full",
                  help="config.model.remat_policy: 'full' is the paper's gradient checkpointing")
  ap.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                  help="config.model.scan_layers (--no-scan: unrolled layers)")
  ap.add_argument("--first", choices=("superclip", "clip"), default="superclip",
                  help="which model is built (and allocated) first")
  ap.add_argument("--probe", type=float, default=20.0,
                  help="seconds of measuring the host's own speed noise first (0: skip)")
  ap.add_argument("--malloc", choices=("tuned", "system"), default="tuned",
                  help="glibc malloc: superclip_jax.host_malloc's settings, or glibc's defaults")
  args = ap.parse_args()
  if args.malloc == "tuned":
    if not host_malloc.active():
      os.environ[host_malloc.OPT_IN] = "tuned"
      host_malloc.reexec()
  elif host_malloc.active():
    sys.exit("--malloc=system, but GLIBC_TUNABLES holds host_malloc's settings: unset it")

  print(f"variant {args.variant}, {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"{args.steps} timed steps each (medians), float32, malloc "
        f"{'tuned' if host_malloc.active() else 'system'}, remat {args.remat}, "
        f"{'scanned' if args.scan else 'unrolled'} layers")
  if args.probe:
    speed = host_speed(args.probe)
    q = np.quantile(speed, [0.05, 0.95])
    print(f"host speed ({args.probe:.0f} s of a fixed loop, 0.25 s windows, / median): sd "
          f"{100 * statistics.pstdev(speed):.1f}%, 5-95% range {q[0]:.2f}-{q[1]:.2f}", flush=True)
  print("batch | fwd GFLOPs sc / clip | head share fwd | step share | temp MB sc / clip | "
        "step ms sc / clip | ratio wall | ratio cpu | page faults/step sc / clip")
  for batch_size in (int(b) for b in args.batch.split(",")):
    runs = measure(args.variant, batch_size, args.steps, args.remat, args.scan, args.first)
    sc, cl = runs["superclip"], runs["clip"]
    ms = {k: 1e3 * statistics.median(r["wall"]) for k, r in runs.items()}
    cpu = {k: statistics.median(r["cpu"]) for k, r in runs.items()}
    wall_ratio, cpu_ratio = ms["superclip"] / ms["clip"], cpu["superclip"] / cpu["clip"]
    print(f"{batch_size:5d} | {sc['forward_flops'] / 1e9:9.3f} / {cl['forward_flops'] / 1e9:9.3f}"
          f" | {100 * (sc['forward_flops'] / cl['forward_flops'] - 1):13.3f}%"
          + (" |    (scan)" if sc["step_flops"] is None else
             f" | {100 * (sc['step_flops'] / cl['step_flops'] - 1):9.3f}%")
          + f" | {sc['temp_bytes'] / 1e6:7.0f} / {cl['temp_bytes'] / 1e6:7.0f}"
          f" | {ms['superclip']:8.1f} / {ms['clip']:8.1f}"
          f" | {wall_ratio:10.3f} | {cpu_ratio:9.3f}"
          f" | {statistics.median(sc['faults']):9.0f} / {statistics.median(cl['faults']):.0f}",
          flush=True)
    print("      target (ratio of the medians <= 1.01): "
          + ("met, wall and CPU" if max(wall_ratio, cpu_ratio) <= 1.01 else "not met"),
          flush=True)
    head_ms = head_alone_ms(sc)
    print(f"      head alone: {head_ms:.0f} ms a step = {100 * head_ms / ms['clip']:.2f}% of the "
          f"CLIP step -> ratio {1 + head_ms / ms['clip']:.3f} if costs add", flush=True)
    for unit in ("wall", "cpu"):  # step i of each mode ran next to each other: pair them
      pairs = [a / b for a, b in zip(sc[unit], cl[unit])]
      ci = median_ci(pairs)
      verdict = ("not enough steps for an interval (6+)" if ci is None else
                 f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]: "
                 + ("all of it" if ci[1] <= 1.01 else "not all of it") + " <= 1.01")
      # How many pairs a +-0.5% interval would take at this spread (normal approximation of
      # the median's standard error, 1.25 sd / sqrt(n)).
      spread = statistics.stdev(pairs) if len(pairs) > 1 else 0.0
      need = math.ceil((1.96 * 1.25 * spread / 0.005) ** 2)
      print(f"      paired {unit:4s} ratio (median of {len(pairs)} side-by-side steps): "
            f"{statistics.median(pairs):.3f}, {verdict}; +-0.5% would take ~{need} pairs",
            flush=True)
    print("      step ms sc: " + " ".join(f"{1e3 * t:.0f}" for t in sc["wall"]) + "; clip: "
          + " ".join(f"{1e3 * t:.0f}" for t in cl["wall"]), flush=True)
    del runs
    host_malloc.release()  # the next batch size's blocks would not fit the freed ones
  print("target: ratio <= 1.01")


if __name__ == "__main__":
  main()
