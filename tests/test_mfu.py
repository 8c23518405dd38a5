"""Model FLOPs per step, device peaks and the throughput fields of the training records."""
import jax
import jax.numpy as jnp
import pytest

from superclip_jax import config_lib, mfu


def _b16(mode="clip", batch=4, **model):
  c = config_lib.base_config()
  c.model.mode = mode
  c.input.batch_size = batch
  for k, v in model.items():
    c.model[k] = v
  shapes = {"image": ((batch, 224, 224, 3), jnp.float32), "tokens": ((batch, 77), jnp.int32),
            "class_tokens": ((batch, 77), jnp.int32)}
  return c, {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def test_b16_train_step_costs_three_forward_passes_whatever_scan_and_remat():
  """Known answer: CLIP B/16 at 224 px is 41.1 GFLOP forward per pair, ~123 to train."""
  config, batch = _b16()
  flops = mfu.model_flops_per_step(config, batch)
  assert 118e9 <= flops / 4 <= 130e9, flops / 4
  scanned, _ = _b16(scan_layers=True, remat_policy="full")
  assert mfu.model_flops_per_step(scanned, batch) == flops  # model work, not what XLA reruns
  superclip, _ = _b16("superclip")
  head = mfu.model_flops_per_step(superclip, batch) / flops - 1
  assert 0.001 < head < 0.01, head  # the head's share: a fraction of a percent


def test_peak_table_and_measured_fallback():
  assert mfu.table_peak_tflops("TPU v5 lite", jnp.bfloat16) == 197.0
  assert mfu.table_peak_tflops("TPU v5p", jnp.bfloat16) == 459.0
  assert mfu.table_peak_tflops("NVIDIA H200", jnp.bfloat16) == 989.0
  assert mfu.table_peak_tflops("NVIDIA H100 80GB HBM3", jnp.float32) == 67.0
  assert mfu.table_peak_tflops("TPU v4", jnp.float32) is None  # not published: measured
  assert mfu.table_peak_tflops("cpu", jnp.float32) is None
  peak, source = mfu.peak_tflops(jnp.float32)
  assert source == "measured" and 0 < peak < 100


def test_step_meter_fields():
  meter = mfu.StepMeter(flops_per_step=8e12, peak_tflops=4.0, batch_size=64, num_devices=2)
  record = meter.record(step_time=2.0)
  assert record["img_per_sec_per_device"] == pytest.approx(64 / 2.0 / 2)
  assert record["tflops_per_device"] == pytest.approx(8.0 / 2.0 / 2)
  assert record["mfu"] == pytest.approx(2.0 / 4.0)
  assert 0.0 <= record["data_wait_fraction"] <= 1.0
