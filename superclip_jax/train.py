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
from superclip_jax import host_malloc, sharding, train_state
from superclip_jax.data import input_pipeline


class NonFiniteError(RuntimeError):
  """A loss or gradient was NaN/Inf under config.nan_policy='stop'."""


def make_train_step(config, model, tx, schedule, mesh=None):
  """Returns step(state, batch) -> (state, metrics). Pure; jit it with shardings.

  With a mesh of several devices the contrastive loss is computed shard-locally
  (`losses.sharded_contrastive_loss`): no device holds the global [batch, batch] logits.

  Gradient accumulation (`config.accum_steps` = k > 1; OpenCLIP's --accum-freq feature
  caching, which keeps every negative): the global batch of B is split into k micro-batches,
  micro-batch i being rows i, i + k, i + 2k, ... (the batch is sharded over the devices in
  contiguous blocks, so strided rows keep each micro-batch spread over all of them).
    1. Forward all k micro-batches without gradient and cache the embeddings zimg, ztxt of
       the whole batch ([B, embed] each).
    2. For each micro-batch: forward again with gradient, put its embeddings into the cached
       ones (same rows), compute the contrastive loss over all B pairs plus the class loss of
       the micro-batch divided by k, and add up the gradients. logit_scale / logit_bias enter
       each of the k contrastive losses directly, so their direct gradient is scaled by 1/k.
  The sum is the full-batch gradient up to float rounding, and the metrics are the full-batch
  values; only one micro-batch's activations are live at a time. The IDF counts advance
  once, with the whole global batch, before any micro-batch uses them. Micro-batch i uses the
  step's RNG folded with i in both passes, so with patch dropout the masks are consistent
  between the passes but differ from those of the same step without accumulation. In
  'superclass' mode (no contrastive loss) it is plain micro-batch gradient averaging.
  k = 1 is the plain full-batch step.
  """
  mode = config.model.mode
  vocab = config.model.vocab_size
  class_weight = config.loss.class_weight
  contrastive = config.loss.contrastive
  use_idf = config.loss.use_idf
  batch_size = config.input.batch_size
  accum_steps = config.get("accum_steps", 1)

  def forward(params, batch, rng):
    return model.apply({"params": params}, batch["image"],
                       None if mode == "superclass" else batch["tokens"], train=True,
                       rngs={"patch_dropout": rng})

  def loss_terms(out, targets, idf_weights):
    terms = {}
    if mode != "superclass":
      terms["contrastive_loss"] = (
          losses.sharded_contrastive_loss(contrastive, out, mesh)
          if mesh is not None and mesh.size > 1 else losses.contrastive_loss(contrastive, out))
    if mode != "clip":
      terms["class_loss"] = losses.idf_class_loss(out["class_logits"], targets, idf_weights)
    return terms

  def total_loss(terms):
    return terms.get("contrastive_loss", 0.0) + class_weight * terms.get("class_loss", 0.0)

  def loss_fn(params, batch, targets, idf_weights, rng):
    terms = loss_terms(forward(params, batch, rng), targets, idf_weights)
    return total_loss(terms), terms

  def constrain(x):  # keep micro-batches and cached embeddings split over all devices
    if mesh is None or mesh.size == 1:
      return x
    return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))

  def micro(x, i):
    """Rows i, i + k, i + 2k, ... of a global-batch array [B, ...] -> [B/k, ...]."""
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
    return constrain(jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False))

  def micro_batch(batch, i):
    keys = ["image"] + (["tokens"] if mode != "superclass" else []) + (
        ["class_tokens"] if mode != "clip" else [])
    return {key: micro(batch[key], i) for key in keys}

  def accumulated_value_and_grad(params, batch, idf_weights, rng):
    """(loss, terms), grads of the full global batch, one micro-batch at a time."""
    k = accum_steps
    cached = None
    if mode != "superclass":
      def embed(i):
        out = forward(params, micro_batch(batch, i), jax.random.fold_in(rng, i))
        return jax.lax.stop_gradient((out["zimg"], out["ztxt"]))
      zimg, ztxt = jax.lax.map(embed, jnp.arange(k))  # [k, B/k, embed]
      # [B/k, k, embed]: row-major flattening gives back the batch's own row order.
      cached = (constrain(jnp.swapaxes(zimg, 0, 1)), constrain(jnp.swapaxes(ztxt, 0, 1)))

    def put(cache, z, i):  # cache [B/k, k, embed] with micro-batch i replaced -> [B, embed]
      full = jax.lax.dynamic_update_index_in_dim(cache, z.astype(cache.dtype), i, axis=1)
      return constrain(full.reshape(-1, full.shape[-1]))

    def micro_loss(params, i):
      mb = micro_batch(batch, i)
      out = forward(params, mb, jax.random.fold_in(rng, i))
      if cached is not None:
        out = dict(out, zimg=put(cached[0], out["zimg"], i), ztxt=put(cached[1], out["ztxt"], i))
        for name in ("logit_scale", "logit_bias"):  # direct gradient counted once over the k
          if name in out:
            fixed = jax.lax.stop_gradient(out[name])
            out[name] = fixed + (out[name] - fixed) / k
      targets = losses.multi_hot(mb["class_tokens"], vocab) if mode != "clip" else None
      terms = loss_terms(out, targets, idf_weights)
      if "class_loss" in terms:  # micro-batch mean / k: the k of them sum to the batch mean
        terms["class_loss"] = terms["class_loss"] / k
      return total_loss(terms), terms

    def body(carry, i):
      grads, terms = carry
      (_, t), g = jax.value_and_grad(micro_loss, has_aux=True)(params, i)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, terms, t)), None

    names = (["contrastive_loss"] if mode != "superclass" else []) + (
        ["class_loss"] if mode != "clip" else [])
    init = (jax.tree.map(jnp.zeros_like, params),
            {name: jnp.zeros((), jnp.float32) for name in names})
    (grads, terms), _ = jax.lax.scan(body, init, jnp.arange(k))
    if "contrastive_loss" in terms:  # each micro-batch computed the same full-batch value
      terms["contrastive_loss"] = terms["contrastive_loss"] / k
    return (total_loss(terms), terms), grads

  def step(state: train_state.TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    idf = state.idf
    targets = idf_weights = None
    if mode != "clip":
      # Counts see the whole global batch before the weights are computed (as the reference).
      targets = losses.multi_hot(batch["class_tokens"], vocab)
      idf = idf.update(targets)
      idf_weights = idf.weights() if use_idf else jnp.ones((vocab,), jnp.float32)
    if accum_steps == 1:
      (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, batch, targets, idf_weights, rng)
    else:
      (loss, terms), grads = accumulated_value_and_grad(state.params, batch, idf_weights, rng)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient drops the whole batch: only the step and the data position
    # advance, so the state stays good (and 'stop' halts with the last good state). lax.cond,
    # not a select over the state: a select keeps the old optimizer state alive beside the new
    # one, so XLA copies every moment buffer each step (2 copies of mu and nu per parameter).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply_update(operands):
      params, opt_state = operands
      updates, opt_state = tx.update(grads, opt_state, params)
      return optim.clamp_logit_scale(optax.apply_updates(params, updates)), opt_state

    params, opt_state = jax.lax.cond(finite, apply_update, lambda operands: operands,
                                     (state.params, state.opt_state))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        idf=jax.tree.map(lambda a, b: jnp.where(finite, a, b), idf, state.idf),
                        examples_seen=state.examples_seen.add(batch_size))
    if "_position" in batch:  # where each source of each process stands after this batch
      new = new.replace(data_position=input_pipeline.advance_position(state.data_position,
                                                                      batch["_position"]))
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
  sharding.check_batch(config.input.batch_size, mesh, config.get("accum_steps", 1))
  input_pipeline.local_batch_size(config.input.batch_size)
  factory = train_state.StateFactory(config, mesh)
  evals = evaluators.build(config, factory.model, mesh)

  checkpoint.write_config(workdir, config)
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

  step_fn = jax.jit(make_train_step(config, factory.model, factory.tx, factory.schedule, mesh),
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
  table, origin = input_pipeline.resume_position(
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


def _log_training(logger, step, pending, config):
  history = jax.device_get(pending)
  nonfinite = _raise_if_nonfinite(history, step, config)
  last = {k: float(v) for k, v in history[-1].items() if k != "nonfinite"}
  last["nonfinite_steps"] = float(nonfinite)
  last.update(input_pipeline.global_data_metrics())
  logger.write(step, logger.progress(step, last))
