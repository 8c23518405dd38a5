"""Compile a config's train step for a Cloud TPU slice from any host, and size it per chip.

  python -m superclip_jax.plan --config=configs/b16.py --topology=v5p-128
  python -m superclip_jax.plan --config=configs/b16.py:platform=tpu-v5e-256 \\
      --topology=v5litepod-64 --batch_per_chip=auto
  python -m superclip_jax.plan --config=configs/demo.py --topology=v5e:2x2 --slices=2

It builds what training builds (the state factory, its shardings, the step jitted with
donation by `train_step.jit_train_step`, the mesh from `sharding.make_mesh`, the multislice
device layout for --slices > 1) and compiles it with the TPU compiler of the `libtpu` wheel
(`pip install -e '.[tpu]'`), which needs no TPU: `jax.experimental.topologies` describes any
slice. What the plan knows exactly: that the step compiles, and its memory per chip
(arguments, outputs, temporaries, aliasing: properties of the compiled program). What it
knows from the model: FLOPs (`mfu.model_flops_per_step`, as training reports them). What it
only estimates: time, from the compiler's cost model, shown only where it is sane and
labelled as an estimate (docs/performance.md, "Planning a TPU run").

On a TPU VM without --topology it compiles for the local devices and says so.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import sys
import time

import jax
import numpy as np

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
  """One Cloud TPU generation, from Google's data sheets (cloud.google.com/tpu/docs/*)."""
  name: str            # the compiler's name ('v5e:2x2')
  gcloud: str          # gcloud's accelerator-type prefix ('v5litepod-16')
  per_chip: int        # what gcloud's number counts per chip: TensorCores (2) or chips (1)
  hbm_gib: float       # HBM per chip
  peak_tflops: float   # dense bf16 peak per chip
  hbm_gbps: float      # HBM bandwidth per chip, GB/s
  shapes: dict         # chips -> the slice's shape as the compiler names it


_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
       256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8"}
GENERATIONS = {
    "v4": Generation("v4", "v4", 2, 32, 275, 1200, _3D),
    "v5e": Generation("v5e", "v5litepod", 1, 16, 197, 819, _2D),
    "v5p": Generation("v5p", "v5p", 2, 95, 459, 2765, _3D),
    "v6e": Generation("v6e", "v6e", 1, 32, 918, 1638, _2D),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: Generation
  shape: str           # '2x2x2'
  slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(int(n) for n in self.shape.split("x")) * self.slices

  @property
  def compiler_name(self) -> str:
    return f"{self.generation.name}:{self.shape}"

  @property
  def compiler_options(self) -> dict:
    """What the compiler needs beyond the name to lay the slice out as Google builds it:
    v4 and v5p run their two TensorCores as one device (megacore; libtpu's default for v4 is a
    device per core) with four chips a host, v5e and v6e eight chips a host (Google's tables:
    v5litepod-256 is 32 hosts), and wrap-around links on a dimension of a full torus
    (every dimension of a 3D slice of 4x4x4 or more; a 16-chip dimension of a 2D one)."""
    dims = [int(n) for n in self.shape.split("x")]
    if len(dims) == 3:
      wrap = (min(dims) >= 4,) * 3
    else:
      wrap = tuple(n == 16 for n in dims) + (False,)
    chips = math.prod(dims)
    if len(dims) == 2 and chips >= 8:  # v5e and v6e hosts hold eight chips, 2x4
      per_host = (2, 4, 1)
    else:
      per_host = (2, 2, 1) if chips >= 4 else (1, 1, 1)
    options = {"chips_per_host_bounds": per_host, "wrap": wrap}
    if self.generation.per_chip == 2:
      options["chip_config_name"] = "megacore"
    return options

  @property
  def gcloud_name(self) -> str:
    g = self.generation
    return f"{g.gcloud}-{self.chips // self.slices * g.per_chip}"


def known_topologies() -> list[str]:
  return [f"{g.gcloud}-{chips * g.per_chip}" for g in GENERATIONS.values() for chips in g.shapes]


def parse_topology(name: str, slices: int = 1) -> Topology:
  """'v5p-128' / 'v5litepod-256' / 'v6e-8' / 'v4-64' (gcloud's --accelerator-type: v4 and v5p
  count TensorCores, two a chip; v5e and v6e count chips) or 'v5e:16x16' (the compiler's)."""
  name = name.strip().lower()
  if slices < 1:
    raise ValueError(f"--slices={slices}: use 1 or more")
  m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name)
  if m:
    gen = GENERATIONS.get(m.group(1))
    if gen and m.group(2) in gen.shapes.values():
      return Topology(gen, m.group(2), slices)
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  if m:
    prefix = {"v5e": "v5litepod"}.get(m.group(1), m.group(1))
    for gen in GENERATIONS.values():
      count = int(m.group(2))
      if gen.gcloud == prefix and count % gen.per_chip == 0 and (
          count // gen.per_chip in gen.shapes):
        return Topology(gen, gen.shapes[count // gen.per_chip], slices)
  compiler = [f"{g.name}:{s}" for g in GENERATIONS.values() for s in g.shapes.values()]
  raise ValueError(f"--topology={name!r} is not a known Cloud TPU slice; use a gcloud "
                   f"accelerator type ({', '.join(known_topologies())}) or the compiler's "
                   f"name ({', '.join(compiler)})")


def tpu_compiler_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def has_local_tpu() -> bool:
  """Whether this host has TPU chips (a TPU VM's /dev/accel* or /dev/vfio devices)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def topology_devices(topology: Topology) -> list:
  """The devices of `topology` for the TPU compiler (no TPU needed), slice by slice."""
  if not tpu_compiler_available():
    raise RuntimeError("the TPU compiler is not installed: pip install -e '.[tpu]' "
                       "(jax[tpu], with libtpu; Python 3.12 for jax >= 0.11)")
  if not has_local_tpu():
    # libtpu's start-up looks for the TPU VM it runs on (the metadata server, the workers'
    # hostnames) and logs errors where there is none; a compile-only host tells it there is
    # none to find. Several such processes may hold libtpu at once (they open no chip).
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", topology.gcloud_name),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
      os.environ.setdefault(key, value)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.compiler_name,
                                      num_slices=topology.slices, **topology.compiler_options)
  return list(desc.devices)


# --- What is compiled --------------------------------------------------------------------------


def abstract_batch(config, global_batch: int, mesh) -> dict:
  """The training batch of a file source (images, both captions, the data-position and
  bad-record columns), as ShapeDtypeStructs split over the mesh's batch axes."""
  from superclip_jax import sharding  # pylint: disable=import-outside-toplevel
  from superclip_jax.data import bad_records  # pylint: disable=import-outside-toplevel
  m, b = config.model, global_batch
  shapes = {"image": ((b, m.image_size, m.image_size, 3), np.float32),
            "tokens": ((b, m.context_length), np.int32),
            "class_tokens": ((b, m.context_length), np.int32),
            "_position": ((b, 4), np.int32), "_epoch": ((b,), np.int32),
            "_skipped": ((b, len(bad_records.REASONS)), np.int32)}
  where = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=where) for k, (s, d) in shapes.items()}


def _shard_bytes(tree) -> int:
  """Bytes of `tree`'s leaves (sharded ShapeDtypeStructs) held by one device."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def with_batch(config, batch_per_chip: int | None, chips: int):
  """`config` with input.batch_size set from the micro-batch per chip (None: as configured)."""
  accum = int(config.get("accum_steps", 1))
  config = copy.deepcopy(config)
  if not config.input.get("data"):
    # The paper configs leave the data to the user; the state holds a read position per data
    # source, so the plan assumes one source (it reads nothing).
    with config.unlocked():
      config.input.data = "wds:/the-plan-reads-no-data/{0..9}.tar"
  if batch_per_chip is not None:
    with config.unlocked():
      config.input.batch_size = int(batch_per_chip) * chips * accum
  elif config.input.batch_size % (chips * accum):
    raise ValueError(f"input.batch_size={config.input.batch_size} with accum_steps={accum} "
                     f"does not split over {chips} chips: pass --batch_per_chip=N (or auto)")
  return config


def compile_step(config, devices) -> dict:
  """Compiles the train step of `config` for `devices`; its per-chip figures."""
  from superclip_jax import mfu, sharding, train_state, train_step  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(config.mesh, devices)
  accum = int(config.get("accum_steps", 1))
  sharding.check_batch(config.input.batch_size, mesh, accum)
  factory = train_state.StateFactory(config, mesh)
  state = factory.abstract_with_shardings()
  batch = abstract_batch(config, config.input.batch_size, mesh)
  chips = len(devices)
  flops = mfu.model_flops_per_step(config, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                            for k, v in batch.items()})
  out = {
      "batch_per_chip": config.input.batch_size // (chips * accum),
      "global_batch": config.input.batch_size, "accum_steps": accum,
      "mesh": dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape))),
      "params_bytes": _shard_bytes(state.params),
      "opt_state_bytes": _shard_bytes(state.opt_state),
      "other_state_bytes": _shard_bytes(state.replace(params=(), opt_state=())),
      "batch_bytes": _shard_bytes(batch),
      "model_tflops_per_chip": flops / chips / 1e12,
  }
  start = time.monotonic()
  try:
    compiled = train_step.jit_train_step(config, factory).lower(state, batch).compile()
  except Exception as e:  # pylint: disable=broad-except
    refusal = hbm_refusal(e)
    if refusal is None:
      raise
    # The TPU compiler refuses a program that cannot fit: what it said it needs is the figure.
    shards = sum(out[k] for k in ("params_bytes", "opt_state_bytes", "other_state_bytes",
                                  "batch_bytes"))
    out.update(compiled=False, refusal=refusal["message"], temp_bytes=refusal["needed_bytes"],
               refused_for=refusal.get("what", "the program"),
               available_bytes=refusal["available_bytes"], argument_bytes=shards,
               total_bytes=shards + refusal["needed_bytes"],
               compile_seconds=time.monotonic() - start)
    return out
  seconds = time.monotonic() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  out.update({
      "compiled": True,
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "code_bytes": int(getattr(memory, "generated_code_size_in_bytes", 0)),
      "compiler_tflops_per_chip": float(cost.get("flops", 0.0)) / 1e12,
      "compiler_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "compiler_seconds": cost.get("optimal_seconds"),
      "compile_seconds": seconds,
  })
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"])
  return out


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_REFUSAL = re.compile(r"required for ([^(]*?) \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                      r"\(([\d.]+)([KMGT]?)\)")


def hbm_refusal(error: Exception) -> dict | None:
  """The TPU compiler's refusal of a program larger than the chip's HBM ('CompileTimeHbmOom:
  ... the total memory required for HLO temporaries (234.35G) exceeds available HBM
  (15.75G)', sizes in binary units) as numbers; None for any other error."""
  text = str(error)
  m = _REFUSAL.search(text)
  if "HbmOom" not in text and m is None:
    return None
  line = next((x.strip() for x in text.splitlines() if "HBM" in x), text.strip())
  line = line.split("RESOURCE_EXHAUSTED: ")[-1]
  if m is None:
    return {"message": line, "needed_bytes": 0, "available_bytes": 0}
  return {"message": line, "what": m.group(1),
          "needed_bytes": int(float(m.group(2)) * _UNITS[m.group(3)]),
          "available_bytes": int(float(m.group(4)) * _UNITS[m.group(5)])}


def eval_steps(config, devices) -> dict:
  """Per configured eval: the per-chip memory of its jitted embedding step (what the
  evaluator's `common.BatchedFn` runs: the image tower, and the text tower where it embeds
  text) at its batch_size, with the parameters sharded as in training."""
  from superclip_jax import evaluators, models, sharding, train_state  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(config.mesh, devices)
  factory = train_state.StateFactory(config, mesh)
  params = factory.abstract_with_shardings().params
  where = sharding.batch_sharding(mesh)
  model, m = factory.model, config.model
  out = {}
  for name, ev in dict(config.evals).items():
    cls = evaluators.REGISTRY.get(ev.get("type", name))
    if cls is None:
      continue
    text = cls.needs_text and models.has_text(m.mode)
    b = int(ev.get("batch_size", 256))
    if b % len(devices):
      out[name] = {"error": f"batch_size={b} does not split over {len(devices)} chips"}
      continue
    batch = {"image": jax.ShapeDtypeStruct((b, m.image_size, m.image_size, 3), np.float32,
                                           sharding=where)}
    if text:
      batch["tokens"] = jax.ShapeDtypeStruct((b, m.context_length), np.int32, sharding=where)

    def embed(p, batch, text=text):
      z, _ = model.apply({"params": p}, batch["image"], method="encode_image")
      out = {"zimg": z}
      if text:
        out["ztxt"] = model.apply({"params": p}, batch["tokens"], method="encode_text")
      return out

    start = time.monotonic()
    try:
      compiled = jax.jit(embed, out_shardings=sharding.replicated(mesh)).lower(
          params, batch).compile()
    except Exception as e:  # pylint: disable=broad-except
      refusal = hbm_refusal(e)
      if refusal is None:
        raise
      out[name] = {"error": f"batch_size={b} does not fit: {refusal['message']}"}
      continue
    mem = compiled.memory_analysis()
    out[name] = {"batch_size": b, "text": bool(text),
                 "argument_bytes": int(mem.argument_size_in_bytes),
                 "temp_bytes": int(mem.temp_size_in_bytes),
                 "total_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
                 "compile_seconds": time.monotonic() - start}
  return out


# --- Reading the figures -----------------------------------------------------------------------


def time_estimate(result: dict, gen: Generation) -> tuple[float | None, str]:
  """(seconds, why): the compiler's time estimate where it is sane (positive, and no faster
  than the chip's peak FLOP/s and HBM bandwidth allow for the step's work), else None and
  why. Never a measurement."""
  if not result.get("compiled", True):
    return None, "the step did not compile"
  est = result.get("compiler_seconds")
  if est is None:
    return None, "the compiler gave no estimate"
  est = float(est)
  if est <= 0:
    return None, f"the compiler's estimate is {est:.4g} s (not positive)"
  floor = max(result["model_tflops_per_chip"] * 1e12 / (gen.peak_tflops * 1e12),
              result["compiler_bytes_accessed"] / (gen.hbm_gbps * 1e9))
  if est < floor:
    return None, (f"the compiler's {est:.4g} s is faster than the chip's peak allows "
                  f"({floor:.4g} s at {gen.peak_tflops:g} TFLOP/s, {gen.hbm_gbps:g} GB/s)")
  return est, "the compiler's cost model (an estimate, not a measurement)"


def fits(result: dict, gen: Generation) -> bool:
  """The TPU compiler compiled the step (it refuses one larger than the chip's HBM, less what
  the runtime keeps) and its total is within the chip's HBM."""
  return result.get("compiled", True) and result["total_bytes"] <= gen.hbm_gib * GIB


def search_batch(compile_at, hbm_bytes: int, start: int = 8, step: int = 8,
                 limit: int = 1 << 16) -> tuple[int | None, list[dict]]:
  """The largest batch per chip (a multiple of `step`, at most `limit`) whose compiled step
  fits `hbm_bytes`, compiling as few times as it can. Memory is nearly affine in the batch, so
  each guess is where the line through the two measured batches nearest the limit crosses it
  (extrapolated at most 4x while nothing fails yet), kept strictly inside what is known; a
  jump in the curve (a layout change) stalls such guesses, so a step that does not halve the
  bracket is followed by a bisection. compile_at(batch) -> the result of `compile_step`.
  Returns (batch or None where not even `start` fits, every result)."""
  tried: dict[int, dict] = {}

  def total(b):
    if b not in tried:
      tried[b] = compile_at(b)
    return tried[b]["total_bytes"]

  lo = hi = None  # the largest batch known to fit, the smallest known not to
  b, bisect = start, False
  while True:
    width = None if lo is None or hi is None else hi - lo
    if total(b) <= hbm_bytes:
      lo = b
    else:
      hi = b
    if lo is None or (hi is not None and hi - lo <= step) or (hi is None and lo >= limit):
      return lo, list(tried.values())
    bisect = (not bisect and width is not None and 2 * (hi - lo) > width)
    below = [x for x in tried if x < lo]
    ref = hi if hi is not None else (max(below) if below else None)
    guess = 2 * lo
    if ref is not None and not bisect:
      slope = (total(ref) - total(lo)) / (ref - lo)
      if slope > 0:
        guess = lo + (hbm_bytes - total(lo)) / slope
    if bisect:
      guess = (lo + hi) / 2
    top = hi if hi is not None else min(limit, 4 * lo) + step
    b = min(max(int(guess) // step * step, lo + step), top - step)


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def table(result: dict, topology: Topology) -> str:
  """The markdown table of one plan, as bench/bench_step.py prints its results."""
  gen = topology.generation
  hbm = gen.hbm_gib * GIB
  est, why = time_estimate(result, gen)
  rows = [
      ("topology", f"{topology.gcloud_name} ({topology.compiler_name}, {topology.chips} "
                   f"chips{f', {topology.slices} slices' if topology.slices > 1 else ''})"),
      ("mesh", " x ".join(f"{k}={v}" for k, v in result["mesh"].items())),
      ("batch", f"{result['batch_per_chip']} per chip x {topology.chips} chips"
                f"{' x %d accum' % result['accum_steps'] if result['accum_steps'] > 1 else ''}"
                f" = {result['global_batch']:,}"),
      ("arguments (GiB/chip)", f"{_gib(result['argument_bytes'])} (params "
                               f"{_gib(result['params_bytes'])}, optimizer "
                               f"{_gib(result['opt_state_bytes'])}, other state "
                               f"{_gib(result['other_state_bytes'])}, batch "
                               f"{_gib(result['batch_bytes'])})"),
  ]
  if result.get("compiled", True):
    rows += [
        ("outputs, aliased (GiB/chip)", f"{_gib(result['output_bytes'])}, "
                                        f"{_gib(result['alias_bytes'])}"),
        ("temporaries (GiB/chip)", _gib(result["temp_bytes"])),
        ("total (GiB/chip)", f"{_gib(result['total_bytes'])} of {gen.hbm_gib:g} GiB HBM: "
                             + (f"fits, {_gib(hbm - result['total_bytes'])} to spare"
                                if fits(result, gen) else
                                f"does NOT fit, {_gib(result['total_bytes'] - hbm)} over")),
    ]
  else:
    rows += [
        ("temporaries (GiB/chip)", f"{_gib(result['temp_bytes'])} (the compiler's figure)"),
        ("total (GiB/chip)", f"does NOT fit: the TPU compiler refused the step, "
                             f"{result['refused_for']} need {_gib(result['temp_bytes'])}, "
                             f"{_gib(result['available_bytes'])} available"),
        ("compiler", result["refusal"]),
    ]
  rows += [
      ("model TFLOP/chip/step", f"{result['model_tflops_per_chip']:.4g}"),
      ("time (estimate)", f"{est:.4g} s/step, {result['batch_per_chip'] / est:,.0f} "
                          f"pairs/s/chip: {why}" if est else f"no estimate: {why}"),
      ("compile", f"{result['compile_seconds']:.1f} s"),
  ]
  for name, ev in result.get("evals", {}).items():
    rows.append((f"eval {name}", ev["error"] if "error" in ev else
                 f"batch {ev['batch_size']}: {_gib(ev['total_bytes'])} GiB/chip "
                 f"({'image + text' if ev['text'] else 'image'} embedding)"))
  return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def needed_for(config_batch: int, batch_per_chip: int, chips: int) -> str:
  """What the largest fitting batch per chip means for the config's global batch."""
  per_step = batch_per_chip * chips
  if per_step >= config_batch:
    return f"the config's global batch {config_batch:,} fits without accumulation"
  accum = math.ceil(config_batch / per_step)
  while config_batch % accum or (config_batch // accum) % chips:
    accum += 1
    if accum > config_batch:
      break
  return (f"the config's global batch {config_batch:,} needs accum_steps={accum} on "
          f"{chips} chips, or {math.ceil(config_batch / batch_per_chip):,} chips without "
          "accumulation")


# --- The command ---------------------------------------------------------------------------------


def define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Config file (get_config); file.py:key=value",
                                  lock_config=False)
  flags.DEFINE_string("topology", None, "A Cloud TPU slice: gcloud's accelerator type "
                      "(v4-64, v5litepod-256, v5p-128, v6e-256) or the compiler's name "
                      "(v5e:16x16); unset on a TPU VM: its own devices.")
  flags.DEFINE_integer("slices", 1, "Multislice: this many slices of --topology ('data' "
                       "split across them over DCN).")
  flags.DEFINE_string("batch_per_chip", None, "The micro-batch per chip (N), or 'auto': the "
                      "largest that fits. Default: the config's input.batch_size.")
  flags.DEFINE_bool("evals", True, "Also compile each configured eval's embedding step.")
  flags.DEFINE_string("json_out", "", "Also write the results here (JSON).")
  flags.mark_flags_as_required(["config"])


def _progress(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def plan(config, topology: Topology | None, batch_per_chip=None, with_evals: bool = True,
         say=_progress) -> dict:
  """The plan of `config` on `topology` (None: this TPU VM's devices); see the module doc."""
  if topology is None:
    if jax.default_backend() != "tpu":
      raise ValueError("--topology is unset and this host has no TPU: name the slice, e.g. "
                       "--topology=v5p-128 (gcloud's accelerator type) or v5e:2x2")
    devices = jax.devices()
    kind = devices[0].device_kind.lower().replace("tpu ", "v").replace(" lite", "e")
    gen = next((g for g in GENERATIONS.values() if kind.startswith(g.name)), None)
    if gen is None:
      raise ValueError(f"this TPU ({devices[0].device_kind}) is not in plan.GENERATIONS")
    shape = next((s for c, s in gen.shapes.items() if c == len(devices)), f"{len(devices)}")
    topology = Topology(gen, shape)
    say(f"Compiling for this TPU VM's {len(devices)} local devices ({devices[0].device_kind})")
  else:
    devices = topology_devices(topology)
  gen = topology.generation
  chips = len(devices)
  hbm = int(gen.hbm_gib * GIB)

  def at(b):
    c = with_batch(config, b, chips)
    r = compile_step(c, devices)
    size = (f"{_gib(r['total_bytes'])} GiB of {gen.hbm_gib:g}" if r["compiled"] else
            f"refused by the compiler, {_gib(r['temp_bytes'])} GiB of temporaries")
    say(f"  batch {r['batch_per_chip']} per chip: {size} ({r['compile_seconds']:.0f} s)")
    return r

  if batch_per_chip == "auto":
    best, tried = search_batch(at, hbm)
    if best is None:
      smallest = min(tried, key=lambda r: r["batch_per_chip"])
      raise ValueError(f"{topology.gcloud_name}: not even {smallest['batch_per_chip']} per "
                       f"chip fits ({_gib(smallest['total_bytes'])} GiB of "
                       f"{gen.hbm_gib:g}): shard more (mesh.fsdp), remat, or a larger chip")
    result = next(r for r in tried if r["batch_per_chip"] == best)
    result["search"] = [{"batch_per_chip": r["batch_per_chip"],
                         "total_bytes": r["total_bytes"]} for r in tried]
    result["advice"] = needed_for(config.input.batch_size, best, chips)
  else:
    result = at(None if batch_per_chip in (None, "") else int(batch_per_chip))
  result.update(topology=topology.gcloud_name, compiler_topology=topology.compiler_name,
                slices=topology.slices, chips=chips, hbm_bytes=hbm,
                fits=fits(result, gen))
  est, why = time_estimate(result, gen)
  result["time_estimate_seconds"], result["time_estimate_note"] = est, why
  if with_evals and config.get("evals"):
    result["evals"] = eval_steps(with_batch(config, result["batch_per_chip"], chips), devices)
  return result


def main(argv):
  del argv
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  from superclip_jax import cli  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    topology = parse_topology(f.topology, f.slices) if f.topology else None
    if topology is not None and not has_local_tpu():
      os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: no TPU runtime to start
    result = plan(f.config, topology, f.batch_per_chip, f.evals)
  except (*cli.ERRORS, RuntimeError) as e:
    cli.exit_with(e)
  topology = parse_topology(result["compiler_topology"], result["slices"])
  print(json.dumps({k: v for k, v in result.items()}, sort_keys=True, default=str))
  print(table(result, topology))
  if "advice" in result:
    print(f"Largest batch per chip that fits: {result['batch_per_chip']}; {result['advice']}")
  if f.json_out:
    with open(f.json_out, "w") as fh:
      json.dump(result, fh, indent=1, default=str)
  sys.stdout.flush()
  if not result["fits"]:
    sys.exit(2)


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
