"""Gradient accumulation that keeps every negative (OpenCLIP's --accum-freq feature caching).

The global batch of B is split into k micro-batches, micro-batch i being rows i, i + k,
i + 2k, ... (the batch is sharded over the devices in contiguous blocks, so strided rows keep
each micro-batch spread over all of them).
  1. Forward all k micro-batches without gradient and cache the embeddings zimg, ztxt of the
     whole batch ([B, embed] each).
  2. For each micro-batch: forward again with gradient, put its embeddings into the cached
     ones (same rows), compute the contrastive loss over all B pairs plus the class loss of
     the micro-batch divided by k, and add up the gradients. logit_scale / logit_bias enter
     each of the k contrastive losses directly, so their direct gradient is scaled by 1/k.
The sum is the full-batch gradient up to float rounding, and the metrics are the full-batch
values; only one micro-batch's activations are live at a time. The caller advances the IDF
counts once, with the whole global batch, before any micro-batch uses them. Micro-batch i
uses the step's RNG folded with i in both passes, so with patch dropout the masks are
consistent between the passes but differ from those of the same step without accumulation.
Without a text tower ('superclass': no contrastive loss) it is plain micro-batch gradient
averaging.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from superclip_jax import losses


def micro_batch(batch: dict, i, steps: int, loss) -> dict:
  """Rows i, i + k, i + 2k, ... of the batch arrays the loss reads: [B, ...] -> [B/k, ...]."""
  def rows(x):
    x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:])
    return loss.constrain(jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False))
  return {key: rows(batch[key]) for key in loss.input_keys}


def value_and_grad(loss, params, batch: dict, idf_weights, rng, *, steps: int):
  """((total, terms), grads) of the whole global batch, computed one micro-batch at a time.

  loss: a `train_step.StepLoss` (forward, terms, total, constrain, has_text, has_head).
  """
  cached = None
  if loss.has_text:
    def embed(i):
      out = loss.forward(params, micro_batch(batch, i, steps, loss), jax.random.fold_in(rng, i))
      return jax.lax.stop_gradient((out["zimg"], out["ztxt"]))
    zimg, ztxt = jax.lax.map(embed, jnp.arange(steps))  # [k, B/k, embed]
    # [B/k, k, embed]: row-major flattening gives back the batch's own row order.
    cached = (loss.constrain(jnp.swapaxes(zimg, 0, 1)),
              loss.constrain(jnp.swapaxes(ztxt, 0, 1)))

  def put(cache, z, i):  # cache [B/k, k, embed] with micro-batch i replaced -> [B, embed]
    full = jax.lax.dynamic_update_index_in_dim(cache, z.astype(cache.dtype), i, axis=1)
    return loss.constrain(full.reshape(-1, full.shape[-1]))

  def micro_loss(params, i):
    mb = micro_batch(batch, i, steps, loss)
    out = loss.forward(params, mb, jax.random.fold_in(rng, i))
    if cached is not None:
      out = dict(out, zimg=put(cached[0], out["zimg"], i), ztxt=put(cached[1], out["ztxt"], i))
      for name in ("logit_scale", "logit_bias"):  # direct gradient counted once over the k
        if name in out:
          fixed = jax.lax.stop_gradient(out[name])
          out[name] = fixed + (out[name] - fixed) / steps
    targets = losses.class_targets(mb["class_tokens"]) if loss.has_head else None
    terms = loss.terms(out, targets, idf_weights)
    if "class_loss" in terms:  # micro-batch mean / k: the k of them sum to the batch mean
      terms["class_loss"] = terms["class_loss"] / steps
    return loss.total(terms), terms

  def body(carry, i):
    grads, terms = carry
    (_, t), g = jax.value_and_grad(micro_loss, has_aux=True)(params, i)
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, terms, t)), None

  init = (jax.tree.map(jnp.zeros_like, params),
          {name: jnp.zeros((), jnp.float32) for name in loss.term_names})
  (grads, terms), _ = jax.lax.scan(body, init, jnp.arange(steps))
  if "contrastive_loss" in terms:  # each micro-batch computed the same full-batch value
    terms["contrastive_loss"] = terms["contrastive_loss"] / steps
  return (loss.total(terms), terms), grads
