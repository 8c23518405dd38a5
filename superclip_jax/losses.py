"""Losses: contrastive (softmax CLIP, sigmoid SigLIP) and SuperCLIP's IDF-weighted class loss.

All are pure functions of global-batch arrays; under `jax.jit` with sharded inputs XLA inserts
the collectives. Inputs may be bfloat16; every reduction is done in float32.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_TWO32 = 4294967296.0


def clip_softmax_loss(zimg, ztxt, logit_scale):
  """Symmetric InfoNCE, as OpenCLIP's `ClipLoss` over the full batch.

  zimg, ztxt: [batch, dim], already L2-normalised. logit_scale: the multiplier itself
  (already exponentiated). Returns the mean of the image->text and text->image
  cross-entropies (a scalar).
  """
  logits = logit_scale * jnp.einsum("id,td->it", zimg, ztxt,
                                    preferred_element_type=jnp.float32)
  labels = jnp.arange(logits.shape[0])
  img_to_txt = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1)
  txt_to_img = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], 0)
  return 0.5 * (jnp.mean(img_to_txt) + jnp.mean(txt_to_img))


def siglip_loss(zimg, ztxt, logit_scale, logit_bias):
  """Sigmoid loss, as OpenCLIP's `SigLipLoss` on one device.

  logits = logit_scale * zimg @ ztxt.T + logit_bias; label +1 on the diagonal, -1 elsewhere;
  returns -sum(log sigmoid(label * logits)) / batch.
  """
  logits = logit_scale * jnp.einsum("id,td->it", zimg, ztxt,
                                    preferred_element_type=jnp.float32) + logit_bias
  labels = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / logits.shape[0]


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


def idf_weights(doc_freq, num_docs):
  """log((num_docs + 1) / (doc_freq + 1)): doc_freq [vocab] counts, num_docs a scalar."""
  doc_freq = jnp.asarray(doc_freq, jnp.float32)
  num_docs = jnp.asarray(num_docs, jnp.float32)
  return jnp.log1p(num_docs) - jnp.log1p(doc_freq)


def idf_class_loss(class_logits, targets, idf):
  """SuperCLIP's classification loss.

  class_logits: [batch, vocab]; targets: [batch, vocab] multi-hot; idf: [vocab] weights.
  Targets are weighted by idf and L1-normalised per row (a row whose weighted sum is 0
  contributes 0); returns the mean over the batch of -sum(t * log_softmax(logits)).
  """
  weighted = targets.astype(jnp.float32) * idf.astype(jnp.float32)[None, :]
  norm = jnp.sum(weighted, axis=-1, keepdims=True)
  t = jnp.where(norm > 0, weighted / jnp.where(norm > 0, norm, 1.0), 0.0)
  logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(t * logp, axis=-1))


@flax.struct.dataclass
class ExactCount:
  """Non-negative integer counters exact to 2**64 without jax_enable_x64.

  Each count is two uint32 words (value = hi * 2**32 + lo); `add` carries exactly. float32
  counters stop being exact at 2**24 and int32 overflows at 2**31, while SuperCLIP's largest
  run sees 12.8e9 captions.
  """
  lo: jax.Array
  hi: jax.Array

  @classmethod
  def zeros(cls, shape=()):
    return cls(jnp.zeros(shape, jnp.uint32), jnp.zeros(shape, jnp.uint32))

  def add(self, increment) -> "ExactCount":
    """increment: non-negative integers < 2**32 (int or float holding an integer)."""
    inc = jnp.asarray(increment).astype(jnp.uint32)
    lo = self.lo + inc  # wraps modulo 2**32
    carry = (lo < self.lo).astype(jnp.uint32)
    return ExactCount(lo, self.hi + carry)

  def value(self):
    """The exact count(s) on the host: a Python int, or an object array of ints."""
    hi, lo = jax.device_get((self.hi, self.lo))
    if hi.ndim == 0:
      return (int(hi) << 32) | int(lo)
    return np.array([(int(h) << 32) | int(l) for h, l in zip(hi.ravel(), lo.ravel())],
                    dtype=object).reshape(hi.shape)

  def to_float(self):
    """float32 approximation (relative error <= 2**-24)."""
    return self.hi.astype(jnp.float32) * _TWO32 + self.lo.astype(jnp.float32)


@flax.struct.dataclass
class IdfCounts:
  """Running document frequencies of every token over all captions seen so far."""
  doc_freq: ExactCount  # [vocab]
  num_docs: ExactCount  # []

  @classmethod
  def zeros(cls, vocab_size: int):
    return cls(ExactCount.zeros((vocab_size,)), ExactCount.zeros(()))

  def update(self, targets) -> "IdfCounts":
    """Adds a global batch of multi-hot targets [batch, vocab]."""
    # Documents per token, as a matrix-vector product: XLA:CPU runs a column sum over
    # [batch, vocab] ~15x slower. 0/1 terms, float32 sums: exact below 2**24 captions per batch.
    targets = targets.astype(jnp.float32)
    per_token = jnp.dot(jnp.ones((targets.shape[0],), jnp.float32), targets,
                        precision=jax.lax.Precision.HIGHEST)
    return IdfCounts(self.doc_freq.add(per_token), self.num_docs.add(targets.shape[0]))

  def weights(self):
    return idf_weights(self.doc_freq.to_float(), self.num_docs.to_float())


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
    n_local = zimg.shape[0]
    offset = jax.lax.axis_index(axes) * n_local
    labels = offset + jnp.arange(n_local)
    img_logits = scale * jnp.einsum("id,td->it", zimg, all_txt,
                                    preferred_element_type=jnp.float32)
    if kind == "softmax":
      txt_logits = scale * jnp.einsum("td,id->ti", ztxt, all_img,
                                      preferred_element_type=jnp.float32)
      i2t = -jnp.take_along_axis(jax.nn.log_softmax(img_logits, axis=1), labels[:, None], 1)
      t2i = -jnp.take_along_axis(jax.nn.log_softmax(txt_logits, axis=1), labels[:, None], 1)
      partial = 0.5 * (jnp.sum(i2t) + jnp.sum(t2i)) / global_batch
    else:
      logits = img_logits + bias
      signs = jnp.where(labels[:, None] == jnp.arange(global_batch)[None, :], 1.0, -1.0)
      partial = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / global_batch
    return jax.lax.psum(partial, axes)

  if kind not in ("softmax", "sigmoid"):
    raise ValueError(f"loss.contrastive must be 'softmax' or 'sigmoid', got {kind!r}")
  bias = out.get("logit_bias", jnp.zeros((), jnp.float32))
  fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())
  return fn(out["zimg"], out["ztxt"], out["logit_scale"], bias)
