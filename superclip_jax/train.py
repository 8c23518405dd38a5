"""The training loop and the jitted train step."""
from __future__ import annotations

import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from superclip_jax import checkpoint, config_lib, evaluators, losses, metrics_log, optim
from superclip_jax import sharding, train_state
from superclip_jax.data import input_pipeline


class NonFiniteError(RuntimeError):
  """A loss or gradient was NaN/Inf under config.nan_policy='stop'."""


def make_train_step(config, model, tx, schedule, mesh=None):
  """Returns step(state, batch) -> (state, metrics). Pure; jit it with shardings.

  With a mesh of several devices the contrastive loss is computed shard-locally
  (`losses.sharded_contrastive_loss`): no device holds the global [batch, batch] logits.
  """
  mode = config.model.mode
  vocab = config.model.vocab_size
  class_weight = config.loss.class_weight
  contrastive = config.loss.contrastive
  use_idf = config.loss.use_idf
  batch_size = config.input.batch_size

  def loss_fn(params, batch, targets, idf_weights, rng):
    out = model.apply({"params": params}, batch["image"],
                      None if mode == "superclass" else batch["tokens"], train=True,
                      rngs={"patch_dropout": rng})
    terms = {}
    if mode != "superclass":
      terms["contrastive_loss"] = (
          losses.sharded_contrastive_loss(contrastive, out, mesh)
          if mesh is not None and mesh.size > 1 else losses.contrastive_loss(contrastive, out))
    if mode != "clip":
      terms["class_loss"] = losses.idf_class_loss(out["class_logits"], targets, idf_weights)
    total = terms.get("contrastive_loss", 0.0) + class_weight * terms.get("class_loss", 0.0)
    return total, terms

  def step(state: train_state.TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    idf = state.idf
    targets = idf_weights = None
    if mode != "clip":
      # Counts see the whole global batch before the weights are computed (as the reference).
      targets = losses.multi_hot(batch["class_tokens"], vocab)
      idf = idf.update(targets)
      idf_weights = idf.weights() if use_idf else jnp.ones((vocab,), jnp.float32)
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, targets, idf_weights, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optim.clamp_logit_scale(optax.apply_updates(state.params, updates))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, idf=idf,
                        examples_seen=state.examples_seen.add(batch_size))
    if "_position" in batch:  # where each source of each process stands after this batch
      new = new.replace(data_position=input_pipeline.advance_position(state.data_position,
                                                                      batch["_position"]))
    # A non-finite loss or gradient drops the whole batch: only the step and the data position
    # advance, so the state stays good (and 'stop' halts with the last good state).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    skipped = state.replace(step=new.step, examples_seen=new.examples_seen,
                            data_position=new.data_position)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, skipped)
    metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "lr": schedule(state.step),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    if "logit_scale" in params:
      metrics["logit_scale"] = jnp.exp(new.params["logit_scale"])
    return new, metrics

  return step


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
  sharding.check_batch(config.input.batch_size, mesh)
  input_pipeline.local_batch_size(config.input.batch_size)
  factory = train_state.StateFactory(config, mesh)
  evals = evaluators.build(config, factory.model, mesh)

  checkpoint.write_config(workdir, config)
  ckpt = checkpoint.Checkpointer(workdir, config)
  if ckpt.latest_step() is not None:
    logging.info("Resuming from %s step %d", ckpt.directory, ckpt.latest_step())
    state = ckpt.restore(factory.abstract_with_shardings())
  elif config.init_from:
    from superclip_jax import convert  # torch-format import; only needed here
    init = jax.tree.map(np.asarray, factory.fresh_params())
    state = factory.create(convert.load_torch_checkpoint(config.init_from, factory.model, init))
  else:
    state = factory.create()

  step_fn = jax.jit(make_train_step(config, factory.model, factory.tx, factory.schedule, mesh),
                    in_shardings=(factory.shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(factory.shardings, sharding.replicated(mesh)),
                    donate_argnums=0)
  logger = metrics_log.MetricLogger(workdir, config.total_steps, config.input.batch_size)
  start_step = int(state.step)
  start_example = state.examples_seen.value()
  ds = input_pipeline.train_dataset(config, start=start_example,
                                    position=np.asarray(jax.device_get(state.data_position)))
  batches = input_pipeline.prefetch_to_device(ds.as_numpy_iterator(),
                                              sharding.batch_sharding(mesh))
  preemption = _Preemption()
  pending = []  # per-step metrics still on device, fetched at log steps
  logger.progress(start_step, {})
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      state, metrics = step_fn(state, next(batches))
      pending.append(metrics)
      last = step == config.total_steps
      if step == stop_after:
        preemption.requested = True
      if step % config.log_training_steps == 0 or last or preemption.requested:
        _log_training(logger, step, pending, config)
        pending = []
      for name, every, evaluator in evals:
        if (every and step % every == 0) or last:
          t0 = time.monotonic()
          results = evaluator.run(state.params)
          logger.write(step, {f"{name}/{k}": v for k, v in results.items()}
                       | {f"{name}/seconds": time.monotonic() - t0})
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


def _raise_if_nonfinite(history, step, config):
  bad = sum(m["nonfinite"] for m in history)
  if bad and config.nan_policy == "stop":
    raise NonFiniteError(
        f"Non-finite loss or gradient in {int(bad)} of the last {len(history)} steps "
        f"(up to step {step}); those updates were not applied and no checkpoint was written "
        "after them. Lower config.lr, set config.grad_clip_norm, or use "
        "config.nan_policy='skip' to drop such batches.")
  return bad


def _log_training(logger, step, pending, config):
  history = jax.device_get(pending)
  nonfinite = _raise_if_nonfinite(history, step, config)
  last = {k: float(v) for k, v in history[-1].items() if k != "nonfinite"}
  last["nonfinite_steps"] = float(nonfinite)
  last.update(input_pipeline.global_data_metrics())
  logger.write(step, logger.progress(step, last))
