"""The training loop: restore or create the state, step, log, evaluate, checkpoint.

The step itself is `train_step.train_step` (gradient accumulation: `gradient_accumulation`).
"""
from __future__ import annotations

import signal
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from superclip_jax import checkpoint, config_lib, evaluators, metrics_log
from superclip_jax import host_malloc, mfu, sharding, train_state, train_step, versions
from superclip_jax.data import input_pipeline, position


class NonFiniteError(RuntimeError):
  """A loss or gradient was NaN/Inf under config.nan_policy='stop'."""


class _Preemption:
  """Turns SIGTERM (a preemption notice) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None
                       ) -> train_state.TrainState:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluates, checkpoints.

  stop_after: leave after this step as a preemption would (checkpoint, then return) — for
  tests and debugging; a later call continues the same run.
  """
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.input.batch_size, mesh, config.get("accum_steps", 1))
  position.local_batch_size(config.input.batch_size)
  factory = train_state.StateFactory(config, mesh)
  evals = evaluators.build(config, factory.model, mesh)

  checkpoint.write_config(workdir, config)
  info = versions.collect()
  versions.write(workdir, info)
  if jax.process_index() == 0:
    print(versions.summary(info), flush=True)
  ckpt = checkpoint.Checkpointer(workdir, config)
  if ckpt.latest_step() is not None:
    logging.info("Resuming from %s step %d", ckpt.directory, ckpt.latest_step())
    state = ckpt.restore(factory.abstract_with_shardings())
    state = _resume_data_position(config, factory, state)
  elif config.init_from:
    from superclip_jax import convert  # torch-format import; only needed here
    init = jax.tree.map(np.asarray, factory.fresh_params())
    state = factory.create(convert.load_torch_checkpoint(config.init_from, factory.model, init))
  else:
    state = factory.create()

  step_fn = jax.jit(train_step.make_train_step(config, factory.model, factory.tx,
                                               factory.schedule, mesh),
                    in_shardings=(factory.shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(factory.shardings, sharding.replicated(mesh)),
                    donate_argnums=0)
  logger = metrics_log.MetricLogger(workdir, config.total_steps, config.input.batch_size)
  start_step = int(state.step)
  start_example = state.examples_seen.value()
  ds = input_pipeline.train_dataset(config, start=start_example,
                                    position=np.asarray(jax.device_get(state.data_position)),
                                    origin=np.asarray(jax.device_get(state.data_origin)))
  batches = input_pipeline.prefetch_to_device(ds.as_numpy_iterator(),
                                              sharding.batch_sharding(mesh))
  preemption = _Preemption()
  pending = []  # per-step metrics still on device, fetched at log steps
  compiled = meter = None
  profile = tuple(config.get("profile_steps", ()))
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      batch = meter.wait(lambda: next(batches)) if meter else next(batches)
      if compiled is None:
        compiled, meter, first_record = _compile_step(step_fn, state, batch, config, mesh)
        logger.progress(step - 1, {})  # the first interval starts after compiling
      if profile and step == profile[0]:
        jax.profiler.start_trace(str(epath.Path(workdir) / "profile"))
      state, metrics = compiled(state, batch)
      if profile and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
      pending.append(metrics)
      last = step == config.total_steps
      if step == stop_after:
        preemption.requested = True
      if step % config.log_training_steps == 0 or last or preemption.requested:
        _log_training(logger, step, pending, config, meter, first_record, compiled)
        pending, first_record = [], None
      for name, every, evaluator in evals:
        if (every and step % every == 0) or last:
          t0 = time.monotonic()
          results = evaluator.run(state.params)
          logger.write(step, {f"{name}/{k}": v for k, v in results.items()}
                       | {f"{name}/seconds": time.monotonic() - t0})
          if host_malloc.active():  # its buffers would otherwise fragment the kept heap
            host_malloc.release()
      if step % config.ckpt_steps == 0 or last or preemption.requested:
        _raise_if_nonfinite(jax.device_get(pending), step, config)
        ckpt.save(step, state)
      if preemption.requested:
        logging.warning("Preempted: saved step %d, exiting.", step)
        break
  finally:
    preemption.restore()
    ckpt.close()
    logger.close()
  return state


def _resume_data_position(config, factory, state):
  """The restored data position, mapped to this run's process count (a no-op if unchanged)."""
  table, origin = position.resume_position(
      config, jax.device_get(state.data_position), jax.device_get(state.data_origin))

  def put(value, target):  # the same value on every process: each fills its own shards
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])
  return state.replace(data_position=put(table, factory.shardings.data_position),
                       data_origin=put(origin, factory.shardings.data_origin))


def _raise_if_nonfinite(history, step, config):
  bad = sum(m["nonfinite"] for m in history)
  if bad and config.nan_policy == "stop":
    raise NonFiniteError(
        f"Non-finite loss or gradient in {int(bad)} of the last {len(history)} steps "
        f"(up to step {step}); those updates were not applied and no checkpoint was written "
        "after them. Lower config.lr, set config.grad_clip_norm, or use "
        "config.nan_policy='skip' to drop such batches.")
  return bad


def _compile_step(step_fn, state, batch, config, mesh):
  """(compiled step, its StepMeter, the first record's one-off fields): compile time, model
  FLOPs per step and the device's peak (`mfu`)."""
  start = time.monotonic()
  compiled = step_fn.lower(state, batch).compile()
  compile_seconds = time.monotonic() - start
  flops = mfu.model_flops_per_step(
      config, {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()})
  peak, source = mfu.peak_tflops(config.model.dtype)
  logging.info("Train step: %.3g model GFLOPs, compiled in %.1f s; peak %.4g TFLOP/s per "
               "device (%s)", flops / 1e9, compile_seconds, peak, source)
  meter = mfu.StepMeter(flops, peak, config.input.batch_size, mesh.size)
  return compiled, meter, {"compile_seconds": compile_seconds, "flops_per_step": flops,
                           "peak_tflops_per_device": peak}


def _log_training(logger, step, pending, config, meter=None, first_record=None, compiled=None):
  history = jax.device_get(pending)
  nonfinite = _raise_if_nonfinite(history, step, config)
  last = {k: float(v) for k, v in history[-1].items() if k != "nonfinite"}
  last["nonfinite_steps"] = float(nonfinite)
  last.update(input_pipeline.global_data_metrics())
  record = logger.progress(step, last)
  if meter is not None:
    record.update(meter.record(record.get("step_time")))
  if first_record is not None:  # once per run: what the step costs before it runs
    memory, _ = mfu.peak_memory_bytes(compiled)
    record.update(first_record, **({} if memory is None else {"peak_memory_bytes": memory}))
  logger.write(step, record)
