"""The training loop: restore or create the state, step, log, evaluate, checkpoint.

The step itself is `train_step.train_step` (gradient accumulation: `gradient_accumulation`).
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from superclip_jax import checkpoint, config_history, config_lib, evaluators, fs, host_malloc
from superclip_jax import metrics_log, mfu, nonfinite, optim, preemption, sharding, train_state
from superclip_jax import train_step, versions, workdir_lock
from superclip_jax.data import bad_records, input_pipeline, position, spec
from superclip_jax.evaluators import summary


NonFiniteError = nonfinite.NonFiniteError


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None
                       ) -> train_state.TrainState:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluates, checkpoints.

  stop_after: leave after this step as a preemption would (checkpoint, then return) — for
  tests and debugging; a later call continues the same run.
  """
  config_lib.validate(config)
  if not str(workdir).strip():
    raise ValueError("--workdir is empty: name the directory (local or gs://) that keeps the "
                     "run's config, checkpoints and metrics")
  with workdir_lock.hold(workdir):  # one trainer per workdir (docs/training.md)
    return _train(config, workdir, stop_after)


def _train(config, workdir, stop_after):
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.input.batch_size, mesh, config.get("accum_steps", 1))
  position.local_batch_size(config.input.batch_size)
  factory = train_state.StateFactory(config, mesh)
  evals = evaluators.build(config, factory.model, mesh)

  ckpt = checkpoint.Checkpointer(workdir, config)
  try:  # nothing is written before the config is known to fit the checkpoints
    changed = config_history.check_and_record(workdir, config, ckpt.latest_step())
  except Exception:
    ckpt.close()
    raise
  info = versions.collect()
  versions.write(workdir, info)
  if jax.process_index() == 0:
    print(versions.summary(info), flush=True)
  state, guard = _restore_or_create(config, factory, ckpt, changed)
  restored = int(state.step)
  data_counts = bad_records.DataCounts(  # continue the restored run's counts
      config.input.batch_size, restored, ckpt.metadata(restored) if restored else None,
      records_read=state.examples_seen.value())

  step_fn = train_step.jit_train_step(config, factory)
  logger = metrics_log.MetricLogger(workdir, config.total_steps, config.input.batch_size)
  start_step = int(state.step)
  start_example = state.examples_seen.value()
  ds = input_pipeline.train_dataset(config, start=start_example,
                                    position=np.asarray(jax.device_get(state.data_position)),
                                    origin=np.asarray(jax.device_get(state.data_origin)),
                                    report=_say)
  stop = preemption.Preemption(config.get("preemption_check_steps", 1),
                               config.get("preemption_barrier_seconds", 600.0))
  # Waits for input in Python, checking the flag: a preemption stops even a stalled read.
  batches = input_pipeline.prefetch_to_device(ds.as_numpy_iterator(),
                                              sharding.batch_sharding(mesh),
                                              stop=lambda: stop.local,
                                              stall_seconds=float(spec.input_field(
                                                  config, "stall_warning_seconds")))
  pending = []  # per-step metrics still on device, fetched at log steps
  compiled = meter = None
  profile = tuple(config.get("profile_steps", ()))
  final = []  # [(name, evaluator, metrics)] after the last step: the run-end summary
  try:
    batch = _next_batch(batches, None, start_step + 1, stop)
    for step in range(start_step + 1, config.total_steps + 1):
      if batch is None:  # preempted before the first batch came: nothing new to save
        break
      if compiled is None:
        compiled, meter, first_record = _compile_step(step_fn, state, batch, config, mesh)
        logger.progress(step - 1, {})  # the first interval starts after compiling
      if profile and step == profile[0]:
        jax.profiler.start_trace(fs.join(workdir, "profile"))
      state, metrics = compiled(state, batch)
      if profile and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
      pending.append(metrics)
      ckpt.check()  # a failed asynchronous save (a full disk) stops the run here, said once
      if config.nan_policy == "stop" and len(pending) > 1:  # the step before: it is done or
        if pending[-2]["nonfinite"]:  # nearly, and this one queued behind it keeps the
          guard.update(jax.device_get(pending[:-1]), step - 1)  # devices busy (no stall)
      last = step == config.total_steps
      if step == stop_after:  # every process alike: no agreement needed
        stop.requested = True
      elif not last:
        stop.agree(step)
      if not (last or stop.requested):  # fetched now, so a preemption while waiting
        batch = _next_batch(batches, meter, step + 1, stop)  # saves this step below
      if step % config.log_training_steps == 0 or last or stop.requested:
        _log_training(logger, step, pending, guard, data_counts, meter, first_record,
                      compiled)
        pending, first_record = [], None
      for name, every, evaluator in evals:
        if (every and step % every == 0) or last:
          t0 = time.monotonic()
          results = evaluator.run(state.params)
          logger.write(step, {f"{name}/{k}": v for k, v in results.items()}
                       | {f"{name}/seconds": time.monotonic() - t0})
          if last:
            final.append((name, evaluator, results))
          if host_malloc.active():  # its buffers would otherwise fragment the kept heap
            host_malloc.release()
      if step % config.ckpt_steps == 0 or last or stop.requested:
        history = jax.device_get(pending)
        guard.update(history, step)  # raises past the limit: no save
        data_counts.update(history, step)
        keep = guard.before_save(step)
        ckpt.save_verified(step, state, guard.metadata(step) | data_counts.metadata(), keep)
      if stop.requested:
        ckpt.wait()  # the handlers stay ours until it is written: a second notice waits
        logging.warning("Preempted: saved step %d, exiting.", step)
        break
  finally:
    batches.close()  # the reader thread lets go of the tf.data iterator
    try:
      ckpt.close()  # waits for the last save
    finally:
      stop.restore()
      logger.close()
  if final:
    summary.report(int(state.step), int(state.examples_seen.value()), final)
  return state


def _say(line: str) -> None:
  """A start-up fact (resuming, init_from, the data): shown at any verbosity, by process 0."""
  if jax.process_index() == 0:
    print(line, flush=True)


def _next_batch(batches, meter, step: int, stop: preemption.Preemption):
  """The batch for `step`, or None if a preemption came while waiting for it (then
  `stop.requested` is set: the loop saves the last step done and leaves; with several
  processes, the others are then stuck in the next step until the job is torn down)."""
  try:
    return meter.wait(lambda: next(batches)) if meter else next(batches)
  except input_pipeline.InputStopped:
    logging.warning("Preempted while waiting for input for step %d.", step)
    stop.requested = True
    return None


def _resume_data_position(config, factory, state):
  """The restored data position, mapped to this run's process count (a no-op if unchanged)."""
  table, origin = position.resume_position(
      config, jax.device_get(state.data_position), jax.device_get(state.data_origin))

  def put(value, target):  # the same value on every process: each fills its own shards
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])
  return state.replace(data_position=put(table, factory.shardings.data_position),
                       data_origin=put(origin, factory.shardings.data_origin))


def _restore_or_create(config, factory, ckpt, changed):
  """(state, nonfinite.Guard): the latest checkpoint, else `init_from`, else a fresh state.

  changed: the config fields that differ from the workdir's last run (`config_history`).
  """
  state = step = None
  if ckpt.latest_step() is not None:
    abstract = factory.abstract_with_shardings()
    new_optimizer = config_history.optimizer_changed(changed)
    if new_optimizer:  # read the saved optimizer state as it was laid out, then start afresh
      abstract = abstract.replace(opt_state=_saved_optimizer_state(config, factory, changed))
    state, step = ckpt.restore_newest_good(
        abstract, allow_none=bool(config.get("ignore_unusable_checkpoints", False)))
  if step is None:
    if not config.init_from:
      return factory.create(), nonfinite.Guard(config)
    from superclip_jax import convert  # torch-format import; only needed here
    init = jax.tree.map(np.asarray, factory.fresh_params())
    batch_size = config.get("init_from_batch_size") or config.input.batch_size
    params, idf = convert.load_torch_init(config.init_from, factory.model, init, batch_size,
                                          report=_say)
    if idf is not None:
      _say(f"init_from: IDF counts of {idf['num_docs']:,} captions carried over (cap_fq and "
           f"num_samples at global batch {batch_size})")
    return factory.create(params, idf), nonfinite.Guard(config)
  if config.init_from:
    logging.warning("config.init_from=%r is ignored: %s has checkpoints, the run resumes from "
                    "step %d (a new --workdir starts from init_from)", config.init_from,
                    ckpt.directory, step)
  _say(f"Resuming from step {step} ({ckpt.directory})")
  if new_optimizer:
    logging.warning("config.frozen or config.grad_clip_norm changed: parameters, counts and "
                    "the data position are restored, the optimizer state starts afresh")
    state = state.replace(opt_state=jax.jit(
        factory.tx.init, out_shardings=factory.shardings.opt_state)(state.params))
  state = _resume_data_position(config, factory, state)
  return state, nonfinite.Guard(config, step, ckpt.metadata(step))


def _saved_optimizer_state(config, factory, changed):
  """The abstract optimizer state of the run before `changed` (frozen, grad_clip_norm)."""
  saved = config.copy_and_resolve_references()
  if "frozen" in changed:
    saved.frozen = tuple(changed["frozen"][0] or ())
  if "grad_clip_norm" in changed:
    saved.grad_clip_norm = float(changed["grad_clip_norm"][0] or 0.0)
  tx, _ = optim.make_optimizer(saved, factory.abstract.params)
  shapes = jax.eval_shape(tx.init, factory.abstract.params)
  shardings = sharding.tree_shardings(config.sharding_rules, shapes, factory.mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


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


def _log_training(logger, step, pending, guard, data_counts, meter=None, first_record=None,
                  compiled=None):
  history = jax.device_get(pending)
  bad = guard.update(history, step)  # raises per config.nan_policy
  data_counts.update(history, step)
  last = {k: float(v) for k, v in history[-1].items()
          if k != "nonfinite" and not k.startswith("data_")}
  last.update(nonfinite_steps=float(bad), nonfinite_steps_total=float(guard.total))
  last.update(data_counts.metrics())
  record = logger.progress(step, last)
  if meter is not None:
    record.update(meter.record(record.get("step_time")))
  if first_record is not None:  # once per run: what the step costs before it runs
    memory, _ = mfu.peak_memory_bytes(compiled)
    record.update(first_record, **({} if memory is None else {"peak_memory_bytes": memory}))
  logger.write(step, record)
