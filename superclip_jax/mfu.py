"""Model FLOPs utilisation: FLOPs per train step, the device's peak, and device memory.

MFU = model FLOPs per step / step time / the device's peak FLOP/s. Model FLOPs are those of the
unrolled step without rematerialisation, from XLA's cost analysis of the lowered program (a
scanned tower's loop body would count once, and recomputation is not model work), so MFU does
not change with `scan_layers` or `remat_policy`. The peak comes from `PEAK_TFLOPS` (dense
bf16 / f32 matmul peaks per chip, from the vendors' data sheets) or, where the chip is not in
the table (CPUs), from a matmul timed on the device (`measured_peak_tflops`).
"""
from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak TFLOP/s per chip, by device_kind prefix: (bfloat16, float32).
# float32 None: not published (TPUs run f32 matmuls as several bf16 passes); measured instead.
PEAK_TFLOPS = {
    "TPU v4": (275.0, None),
    "TPU v5 lite": (197.0, None),  # v5e
    "TPU v5e": (197.0, None),
    "TPU v5p": (459.0, None),
    "TPU v5": (459.0, None),
    "TPU v6 lite": (918.0, None),  # v6e (Trillium)
    "TPU v6e": (918.0, None),
    "NVIDIA A100": (312.0, 19.5),
    "NVIDIA H100": (989.0, 67.0),  # SXM
    "NVIDIA H200": (989.0, 67.0),
}


def table_peak_tflops(device_kind: str, dtype) -> float | None:
  """The data-sheet peak of `device_kind` for `dtype` matmuls, or None if not in the table."""
  for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):  # 'TPU v5 lite' before 'TPU v5'
    if device_kind.startswith(prefix):
      bf16, f32 = PEAK_TFLOPS[prefix]
      return f32 if jnp.dtype(dtype) == jnp.float32 else bf16
  return None


def measured_peak_tflops(dtype, size: int | None = None, reps: int = 5,
                         device=None) -> float:
  """TFLOP/s of the best of `reps` [size, size] @ [size, size] matmuls on one device."""
  device = device or jax.local_devices()[0]
  size = size or (1024 if device.platform == "cpu" else 8192)
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))  # compile
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e12


def peak_tflops(dtype, device=None) -> tuple[float, str]:
  """(peak TFLOP/s per device, 'table' or 'measured'); measured once per process and device
  (runs trained one after another in one process, as the study does, reuse it)."""
  device = device or jax.local_devices()[0]
  peak = table_peak_tflops(device.device_kind, dtype)
  if peak is not None:
    return peak, "table"
  key = (device.platform, device.id, jnp.dtype(dtype).name)
  if key not in _MEASURED_PEAKS:
    _MEASURED_PEAKS[key] = measured_peak_tflops(dtype, device=device)
  return _MEASURED_PEAKS[key], "measured"


_MEASURED_PEAKS: dict = {}
_MODEL_FLOPS: dict = {}  # (config JSON, batch shapes) -> FLOPs: lowering costs seconds


def cost_flops(cost) -> float:
  """FLOPs from a `cost_analysis()` result (a dict, or a list holding one)."""
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def model_flops_per_step(config, abstract_batch: dict) -> float:
  """Global FLOPs of one train step of `config` at the batch's shapes: the unrolled model,
  without remat, lowered on one device from abstract shapes (nothing is compiled or run).
  Remembered per config and shapes for the process's later runs."""
  key = (config.to_json_best_effort(sort_keys=True),
         tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in abstract_batch.items())))
  if key not in _MODEL_FLOPS:
    _MODEL_FLOPS[key] = _model_flops_per_step(config, abstract_batch)
  return _MODEL_FLOPS[key]


def _model_flops_per_step(config, abstract_batch: dict) -> float:
  from superclip_jax import sharding, train_state, train_step  # pylint: disable=import-outside-toplevel
  unrolled = copy.deepcopy(config)
  with unrolled.unlocked():
    unrolled.model.scan_layers = False
    unrolled.model.remat_policy = "none"
    unrolled.accum_steps = 1  # the second forward pass of accumulation is not model work
    unrolled.mesh.data, unrolled.mesh.fsdp = 1, 1
  mesh = sharding.make_mesh(unrolled.mesh, devices=jax.local_devices()[:1])
  factory = train_state.StateFactory(unrolled, mesh)
  step = train_step.make_train_step(unrolled, factory.model, factory.tx, factory.schedule)
  batch = {k: v for k, v in abstract_batch.items() if not k.startswith("_")}
  return cost_flops(jax.jit(step).lower(factory.abstract, batch).cost_analysis())


def peak_memory_bytes(compiled=None) -> tuple[int | None, str]:
  """(peak bytes on one device, source): the allocator's peak where the device reports one
  (GPU, TPU), else what the compiled step needs (arguments + outputs + temporaries)."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device"
  if compiled is not None:
    m = compiled.memory_analysis()
    if m is not None:
      return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes), "compiled"
  return None, "unknown"


class StepMeter:
  """Per-log-interval throughput fields of the training records, from the step time.

  `wait()` wraps each fetch of the next batch, so `data_wait_fraction` is the share of the
  interval's wall time the loop spent waiting for input (near 1: the input pipeline is the
  bottleneck; near 0: the step is).
  """

  def __init__(self, flops_per_step: float, peak_tflops: float, batch_size: int,
               num_devices: int):
    self.flops_per_step = flops_per_step
    self.peak_tflops = peak_tflops
    self.batch_size = batch_size
    self.num_devices = num_devices
    self._waited = 0.0
    self._since = time.perf_counter()

  def wait(self, fetch):
    start = time.perf_counter()
    out = fetch()
    self._waited += time.perf_counter() - start
    return out

  def record(self, step_time: float | None) -> dict:
    """The interval's fields (none but the wait before a step time is known); restarts it."""
    now = time.perf_counter()
    out = {"data_wait_fraction": self._waited / max(now - self._since, 1e-9)}
    self._waited, self._since = 0.0, now
    if step_time:
      tflops = self.flops_per_step / step_time / self.num_devices / 1e12
      out.update(img_per_sec_per_device=self.batch_size / step_time / self.num_devices,
                 tflops_per_device=tflops, mfu=tflops / self.peak_tflops)
    return out
