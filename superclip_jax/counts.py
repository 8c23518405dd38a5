"""Exact counters kept in the train state: examples seen and the IDF document frequencies."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from superclip_jax import losses

_TWO32 = 4294967296.0


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
    return np.array([(int(h) << 32) | int(w) for h, w in zip(hi.ravel(), lo.ravel())],
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

  @classmethod
  def from_counts(cls, doc_freq, num_docs) -> "IdfCounts":
    """Exact counts given as whole numbers (doc_freq [vocab], num_docs), each < 2**64; the
    words are host (numpy) arrays, for `jax.device_put` to any sharding."""
    def words(x):
      x = np.asarray(x, np.uint64)
      return ExactCount((x & np.uint64(0xFFFFFFFF)).astype(np.uint32),
                        (x >> np.uint64(32)).astype(np.uint32))
    return cls(words(doc_freq), words(num_docs))

  def update(self, targets) -> "IdfCounts":
    """Adds a global batch of multi-hot targets [batch, vocab]."""
    # Documents per token, as a matrix-vector product: XLA:CPU runs a column sum over
    # [batch, vocab] ~15x slower. 0/1 terms, float32 sums: exact below 2**24 captions per batch.
    targets = targets.astype(jnp.float32)
    per_token = jnp.dot(jnp.ones((targets.shape[0],), jnp.float32), targets,
                        precision=jax.lax.Precision.HIGHEST)
    return IdfCounts(self.doc_freq.add(per_token), self.num_docs.add(targets.shape[0]))

  def add_captions(self, tokens, distinct) -> "IdfCounts":
    """`update(multi_hot(tokens))` from the sparse form: tokens int [batch, context], distinct
    `losses.distinct_tokens(tokens)`; a scatter-add of integers, exact."""
    per_token = jnp.zeros(self.doc_freq.lo.shape, jnp.uint32).at[tokens].add(
        distinct.astype(jnp.uint32))
    return IdfCounts(self.doc_freq.add(per_token), self.num_docs.add(tokens.shape[0]))

  def weights(self):
    return losses.idf_weights(self.doc_freq.to_float(), self.num_docs.to_float())
