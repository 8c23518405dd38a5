"""Losses: contrastive (softmax CLIP, sigmoid SigLIP) and SuperCLIP's IDF-weighted class loss.

All are pure functions of global-batch arrays; under `jax.jit` with sharded inputs XLA inserts
the collectives. Inputs may be bfloat16; every reduction is done in float32. Each contrastive
formula is written once, over a block of rows (`softmax_rows`, `sigmoid_rows`): the global
loss is the block of all rows, the shard-local loss sums each device's block. The running IDF
counts are state, in `counts`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_rows(img_logits, txt_logits, labels, global_batch: int):
  """The CLIP softmax loss's share from some rows of the [batch, batch] logits.

  img_logits [rows, batch] (these images against every text), txt_logits [rows, batch] (these
  texts against every image), labels [rows]: the column of each row's pair. The shares of all
  rows add up to the mean of the image->text and text->image cross-entropies.
  """
  i2t = -jnp.take_along_axis(jax.nn.log_softmax(img_logits, axis=1), labels[:, None], 1)
  t2i = -jnp.take_along_axis(jax.nn.log_softmax(txt_logits, axis=1), labels[:, None], 1)
  return 0.5 * (jnp.sum(i2t) + jnp.sum(t2i)) / global_batch


def sigmoid_rows(logits, labels, global_batch: int):
  """The SigLIP loss's share from some rows: logits [rows, batch] (bias included), labels
  [rows] the column of each row's pair (+1 there, -1 elsewhere); -sum(log sigmoid) / batch."""
  signs = jnp.where(labels[:, None] == jnp.arange(logits.shape[1])[None, :], 1.0, -1.0)
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / global_batch


def _similarity(a, b, scale):
  return scale * jnp.einsum("id,td->it", a, b, preferred_element_type=jnp.float32)


def clip_softmax_loss(zimg, ztxt, logit_scale):
  """Symmetric InfoNCE, as OpenCLIP's `ClipLoss` over the full batch.

  zimg, ztxt: [batch, dim], already L2-normalised. logit_scale: the multiplier itself
  (already exponentiated). Returns the mean of the image->text and text->image
  cross-entropies (a scalar).
  """
  logits = _similarity(zimg, ztxt, logit_scale)
  return softmax_rows(logits, logits.T, jnp.arange(logits.shape[0]), logits.shape[0])


def siglip_loss(zimg, ztxt, logit_scale, logit_bias):
  """Sigmoid loss, as OpenCLIP's `SigLipLoss` on one device.

  logits = logit_scale * zimg @ ztxt.T + logit_bias; label +1 on the diagonal, -1 elsewhere;
  returns -sum(log sigmoid(label * logits)) / batch.
  """
  logits = _similarity(zimg, ztxt, logit_scale) + logit_bias
  return sigmoid_rows(logits, jnp.arange(logits.shape[0]), logits.shape[0])


def multi_hot(tokens, vocab_size: int = 49408):
  """int [batch, context] token ids -> float32 [batch, vocab]: 1 where the id occurs.

  Only positions up to and including the EOT token (the row's argmax, the position the text
  tower pools) count: what follows is padding. The official SuperCLIP code scatters every
  position, so its labels also mark id 0 ("!", which doubles as the padding id) for every
  caption shorter than the context; ours mark it only where "!" really occurs.
  """
  batch, length = tokens.shape
  eot = jnp.argmax(tokens, axis=-1)
  valid = (jnp.arange(length)[None, :] <= eot[:, None]).astype(jnp.float32)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], tokens.shape)
  return jnp.zeros((batch, vocab_size), jnp.float32).at[rows, tokens].max(valid)


def distinct_tokens(tokens):
  """int [batch, context] token ids -> bool [batch, context]: True at the first position of
  each id up to and including EOT. The ids marked are exactly `multi_hot`'s ones, kept sparse
  ([batch, context], not [batch, vocab]): what `sparse_idf_class_loss` and
  `IdfCounts.add_captions` read."""
  pos = jnp.arange(tokens.shape[1])
  valid = pos[None, :] <= jnp.argmax(tokens, axis=-1)[:, None]
  earlier = pos[None, :] < pos[:, None]  # [i, j]: j comes before i
  repeat = jnp.any((tokens[:, :, None] == tokens[:, None, :]) & earlier[None], axis=-1)
  return valid & ~repeat


def class_targets(tokens):
  """The class loss's targets, sparse: (token ids, `distinct_tokens` of them)."""
  return tokens, distinct_tokens(tokens)


def idf_weights(doc_freq, num_docs):
  """log((num_docs + 1) / (doc_freq + 1)): doc_freq [vocab] counts, num_docs a scalar."""
  doc_freq = jnp.asarray(doc_freq, jnp.float32)
  num_docs = jnp.asarray(num_docs, jnp.float32)
  return jnp.log1p(num_docs) - jnp.log1p(doc_freq)


def _l1_normalise(weighted):
  """Rows of non-negative weights over their sum; a row summing to 0 stays 0."""
  norm = jnp.sum(weighted, axis=-1, keepdims=True)
  return jnp.where(norm > 0, weighted / jnp.where(norm > 0, norm, 1.0), 0.0)


def idf_class_loss(class_logits, targets, idf):
  """SuperCLIP's classification loss.

  class_logits: [batch, vocab]; targets: [batch, vocab] multi-hot; idf: [vocab] weights.
  Targets are weighted by idf and L1-normalised per row (a row whose weighted sum is 0
  contributes 0); returns the mean over the batch of -sum(t * log_softmax(logits)).
  """
  t = _l1_normalise(targets.astype(jnp.float32) * idf.astype(jnp.float32)[None, :])
  logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(t * logp, axis=-1))


def sparse_idf_class_loss(class_logits, tokens, distinct, idf):
  """`idf_class_loss(class_logits, multi_hot(tokens), idf)` without a [batch, vocab] target.

  tokens: int [batch, context]; distinct: `distinct_tokens(tokens)`. A row's loss
  -sum_v t_v log_softmax(z)_v is sum_j t_j (logsumexp(z) - z[token_j]) over its distinct
  tokens (sum_j t_j is 1, or 0 for a row with no weight), so the targets' weighting and
  normalisation work on [batch, context], and the only [batch, vocab] passes left are the
  logits' logsumexp and, in the backward pass, softmax(z) less the scattered t. On a
  memory-bound step (a small tower, or any tower at a small batch) the dense form's extra
  passes over [batch, vocab] were most of the head's cost (docs/performance.md).
  """
  logits = class_logits.astype(jnp.float32)
  t = _l1_normalise(jnp.where(distinct, idf.astype(jnp.float32)[tokens], 0.0))
  picked = jnp.take_along_axis(logits, tokens, axis=-1)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return jnp.mean(jnp.sum(t, axis=-1) * lse - jnp.sum(t * picked, axis=-1))


def contrastive_loss(kind: str, out):
  """Dispatch on config.loss.contrastive: 'softmax' (CLIP) or 'sigmoid' (SigLIP)."""
  if kind == "softmax":
    return clip_softmax_loss(out["zimg"], out["ztxt"], out["logit_scale"])
  if kind == "sigmoid":
    return siglip_loss(out["zimg"], out["ztxt"], out["logit_scale"], out["logit_bias"])
  raise ValueError(f"loss.contrastive must be 'softmax' or 'sigmoid', got {kind!r}")


def sharded_contrastive_loss(kind: str, out, mesh, batch_axes=("data", "fsdp")):
  """The same loss as `contrastive_loss`, computed so that no device holds more than
  [local batch, global batch] logits (OpenCLIP's --local-loss --gather-with-grad).

  Each device all-gathers the other side's embeddings and scores its own rows against the
  whole batch, for image->text and text->image separately; per-device partial sums are added
  with psum. Gradients flow through the gathers (their transpose is a reduce-scatter).
  """
  from jax.sharding import PartitionSpec as P

  axes = tuple(a for a in batch_axes if a in mesh.shape)
  global_batch = out["zimg"].shape[0]
  spec = P(axes)

  def local(zimg, ztxt, scale, bias):
    all_img = jax.lax.all_gather(zimg, axes, axis=0, tiled=True)
    all_txt = jax.lax.all_gather(ztxt, axes, axis=0, tiled=True)
    labels = jax.lax.axis_index(axes) * zimg.shape[0] + jnp.arange(zimg.shape[0])
    img_logits = _similarity(zimg, all_txt, scale)
    if kind == "softmax":
      partial = softmax_rows(img_logits, _similarity(ztxt, all_img, scale), labels,
                             global_batch)
    else:
      partial = sigmoid_rows(img_logits + bias, labels, global_batch)
    return jax.lax.psum(partial, axes)

  if kind not in ("softmax", "sigmoid"):
    raise ValueError(f"loss.contrastive must be 'softmax' or 'sigmoid', got {kind!r}")
  bias = out.get("logit_bias", jnp.zeros((), jnp.float32))
  fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())
  return fn(out["zimg"], out["ztxt"], out["logit_scale"], bias)
