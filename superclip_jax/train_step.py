"""The train step: (state, global batch) -> (state, metrics). Pure; jit it with shardings.

Imports no TensorFlow, so a step can be built and timed where only JAX is installed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from superclip_jax import gradient_accumulation, losses, optim, param_rules, sharding, train_state
from superclip_jax.data import position


@dataclasses.dataclass(frozen=True)
class StepLoss:
  """One batch's forward pass and loss: contrastive + class_weight × IDF class loss.

  With a mesh of several devices the contrastive loss is computed shard-locally
  (`losses.sharded_contrastive_loss`): no device holds the global [batch, batch] logits.
  """
  model: Any
  contrastive: str
  class_weight: float
  mesh: Any = None
  frozen: tuple[str, ...] = ()  # parameter regexes differentiated as constants (`stop_frozen`)

  @property
  def has_text(self) -> bool:
    return self.model.has_text

  @property
  def has_head(self) -> bool:
    return self.model.has_head

  @property
  def vocab(self) -> int:
    return self.model.vocab_size

  @property
  def input_keys(self) -> tuple[str, ...]:
    """The batch arrays the loss reads."""
    return ("image",) + ("tokens",) * self.has_text + ("class_tokens",) * self.has_head

  @property
  def term_names(self) -> tuple[str, ...]:
    return ("contrastive_loss",) * self.has_text + ("class_loss",) * self.has_head

  def forward(self, params, batch, rng):
    params = stop_frozen(params, self.frozen)
    return self.model.apply({"params": params}, batch["image"],
                            batch["tokens"] if self.has_text else None, train=True,
                            rngs={"patch_dropout": rng})

  def terms(self, out, targets, idf_weights) -> dict:
    terms = {}
    if self.has_text:
      terms["contrastive_loss"] = (
          losses.sharded_contrastive_loss(self.contrastive, out, self.mesh)
          if self.mesh is not None and self.mesh.size > 1
          else losses.contrastive_loss(self.contrastive, out))
    if self.has_head:
      terms["class_loss"] = losses.sparse_idf_class_loss(out["class_logits"], *targets,
                                                         idf_weights)
    return terms

  def total(self, terms):
    return terms.get("contrastive_loss", 0.0) + self.class_weight * terms.get("class_loss", 0.0)

  def __call__(self, params, batch, targets, idf_weights, rng):
    terms = self.terms(self.forward(params, batch, rng), targets, idf_weights)
    return self.total(terms), terms

  def constrain(self, x):
    """Keeps micro-batches and cached embeddings split over all devices."""
    if self.mesh is None or self.mesh.size == 1:
      return x
    return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(self.mesh))


def stop_frozen(params, frozen: tuple[str, ...]):
  """`params` with `jax.lax.stop_gradient` on the leaves named by the `frozen` regexes.

  Differentiated through this, a frozen group gets an exact zero gradient without a backward
  pass of its own: a locked image tower (LiT, `frozen=('visual/.*',)`) runs forward only.
  The optimizer still leaves those leaves untouched (`optim.make_optimizer`).
  """
  if not frozen:
    return params
  mask = param_rules.matches_any(frozen, params)
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, mask)


def train_step(state: train_state.TrainState, batch: dict, *, loss: StepLoss, tx, schedule,
               use_idf: bool, batch_size: int, accum_steps: int = 1, check_update: bool = True):
  """One optimizer step on one global batch; `accum_steps` > 1: `gradient_accumulation`.

  check_update=False leaves out the updated parameters' finiteness check (below): only for
  bench/bench_guard.py, which measures what the check costs."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  idf = state.idf
  targets = idf_weights = None
  if loss.has_head:
    # Counts see the whole global batch before the weights are computed (as the reference).
    targets = losses.class_targets(batch["class_tokens"])
    idf = idf.add_captions(*targets)
    idf_weights = idf.weights() if use_idf else jnp.ones((loss.vocab,), jnp.float32)
  if accum_steps == 1:
    (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params, batch, targets, idf_weights, rng)
  else:
    (value, terms), grads = gradient_accumulation.value_and_grad(
        loss, state.params, batch, idf_weights, rng, steps=accum_steps)
  grad_norm = optax.tree.norm(grads)

  def apply_update(operands):
    params, opt_state = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    return optim.clamp_logit_scale(optax.apply_updates(params, updates)), opt_state

  # A non-finite loss, gradient or updated state drops the whole batch: only the step and the
  # data position advance, so params, optimizer state and IDF counts stay bitwise as they were
  # (and 'stop' halts with the last good state). Finite gradients can still give a non-finite
  # update (an lr or eps the optimizer divides by badly), so the update is tried first for its
  # finiteness alone: XLA fuses that into one reduction and materialises nothing of it. The
  # kept update is then computed again inside lax.cond, not selected: a select keeps the old
  # optimizer state alive beside the new one, so XLA copies every moment buffer each step.
  finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
  if check_update:
    finite &= all_finite(apply_update((state.params, state.opt_state))[0])
  params, opt_state = jax.lax.cond(finite, apply_update, lambda operands: operands,
                                   (state.params, state.opt_state))
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                      idf=jax.tree.map(lambda a, b: jnp.where(finite, a, b), idf, state.idf),
                      examples_seen=state.examples_seen.add(batch_size))
  if "_position" in batch:  # where each source of each process stands after this batch
    new = new.replace(data_position=position.advance_position(state.data_position,
                                                              batch["_position"]))
  metrics = {"loss": value, **terms, "grad_norm": grad_norm, "lr": schedule(state.step),
             "nonfinite": 1.0 - finite.astype(jnp.float32)}
  if "logit_scale" in params:
    metrics["logit_scale"] = jnp.exp(new.params["logit_scale"])
  if "_skipped" in batch:  # this global batch's share of the data counts (bad_records)
    metrics["data_skipped"] = jnp.sum(batch["_skipped"], axis=0)
    metrics["data_epoch"] = jnp.max(jnp.where(batch["_position"][:, 1] == 0, batch["_epoch"], -1))
    metrics["data_epoch_rows"] = epoch_rows(batch["_position"][:, 1], batch["_epoch"],
                                            state.data_position.shape[1])
  return new, metrics


def all_finite(tree):
  """bool []: every floating-point element of `tree` is finite (exact, unlike a norm's
  overflow)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


# Epochs that one batch's rows of a source may span and still be counted exactly (`epoch_rows`).
EPOCH_BINS = 8


def epoch_rows(source, epoch, num_sources: int, bins: int = EPOCH_BINS):
  """int [num_sources, 1 + bins]: per source, the newest epoch among its rows in the batch (-1
  if none), then its rows counted by epoch modulo `bins`. `bad_records.DataCounts` maps bin b
  back to the epoch e <= newest with e = b (mod bins): exact while a batch's rows of a source
  lie within `bins` epochs of each other (a shuffle buffer mixes two; processes with unequal
  shares of the shards can be a few passes apart)."""
  mine = source[None, :] == jnp.arange(num_sources)[:, None]  # [sources, batch]
  newest = jnp.max(jnp.where(mine, epoch[None, :], -1), axis=1)
  in_bin = (epoch[None, :] % bins) == jnp.arange(bins)[:, None]  # [bins, batch]
  counts = jnp.sum(mine[:, None, :] & in_bin[None, :, :], axis=2)  # [sources, bins]
  return jnp.concatenate([newest[:, None], counts], axis=1).astype(jnp.int32)


def make_train_step(config, model, tx, schedule, mesh=None):
  """`train_step` bound to the config: step(state, batch) -> (state, metrics)."""
  return functools.partial(
      train_step, loss=StepLoss(model, config.loss.contrastive, config.loss.class_weight, mesh,
                         tuple(config.get("frozen", ()))),
      tx=tx, schedule=schedule, use_idf=config.loss.use_idf,
      batch_size=config.input.batch_size, accum_steps=config.get("accum_steps", 1))


def jit_train_step(config, factory: train_state.StateFactory):
  """The step as training runs it: jitted with the state's shardings, the batch split over
  the mesh's batch axes, metrics replicated, and the old state donated (its buffers reused)."""
  mesh = factory.mesh
  return jax.jit(make_train_step(config, factory.model, factory.tx, factory.schedule, mesh),
                 in_shardings=(factory.shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(factory.shardings, sharding.replicated(mesh)),
                 donate_argnums=0)
