import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from superclip_jax import losses
from superclip_jax.counts import ExactCount, IdfCounts
from tests import np_reference as ref


def _unit(rng, n, d):
  return ref.normalize(rng.normal(size=(n, d)))


@pytest.mark.parametrize("n", [1, 5, 16])
def test_clip_softmax_loss_matches_numpy(n):
  rng = np.random.default_rng(n)
  zi, zt = _unit(rng, n, 8), _unit(rng, n, 8)
  got = losses.clip_softmax_loss(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32),
                                 14.3)
  np.testing.assert_allclose(got, ref.clip_loss(zi, zt, 14.3), rtol=1e-5, atol=1e-6)


def test_clip_softmax_loss_is_log_n_for_identical_embeddings():
  z = jnp.ones((7, 4)) / 2.0  # every logit equal -> uniform softmax
  np.testing.assert_allclose(losses.clip_softmax_loss(z, z, 10.0), math.log(7), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 6])
def test_siglip_loss_matches_numpy(n):
  rng = np.random.default_rng(10 + n)
  zi, zt = _unit(rng, n, 8), _unit(rng, n, 8)
  got = losses.siglip_loss(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), 10.0,
                           -10.0)
  np.testing.assert_allclose(got, ref.siglip_loss(zi, zt, 10.0, -10.0), rtol=1e-5)


def test_multi_hot_counts_positions_up_to_eot_only():
  tokens = np.array([
      [49406, 5, 7, 5, 49407, 0, 0, 0],  # padding 0 after EOT does not count
      [49406, 0, 3, 49407, 0, 0, 0, 0],  # a real "!" (id 0) before EOT counts
      [49406, 9, 9, 9, 9, 9, 9, 49407],  # no padding
  ])
  got = np.asarray(losses.multi_hot(jnp.asarray(tokens), 49408))
  assert got.shape == (3, 49408) and got.dtype == np.float32
  expected = np.zeros_like(got)
  for r, row in enumerate(tokens):
    eot = int(np.argmax(row))
    for t in row[:eot + 1]:
      expected[r, t] = 1.0
  np.testing.assert_array_equal(got, expected)
  assert got[0, 0] == 0 and got[1, 0] == 1


def test_idf_weights_formula():
  df = np.array([0, 1, 10, 100])
  got = losses.idf_weights(df, 100)
  np.testing.assert_allclose(got, np.log(101 / (df + 1)), rtol=1e-6)
  assert float(got[-1]) == 0.0


def test_idf_class_loss_matches_numpy_and_zero_rows_contribute_zero():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 12))
  targets = (rng.random((4, 12)) < 0.3).astype(np.float64)
  targets[2] = 0.0  # no tokens at all
  idf = rng.random(12) * 3
  idf[0] = 0.0
  targets[3] = 0.0
  targets[3, 0] = 1.0  # only a zero-weight token: weighted sum 0
  got = losses.idf_class_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                              jnp.asarray(idf, jnp.float32))
  np.testing.assert_allclose(got, ref.idf_class_loss(logits, targets, idf), rtol=1e-5)


def _captions(rng, batch, length, vocab):
  """Token rows as the tokenizer writes them: SOT, ids with repeats (a small vocab), EOT,
  padding 0; one row fills the context, one holds a real "!" (id 0) before EOT."""
  tokens = np.zeros((batch, length), np.int32)
  for r in range(batch):
    n = length - 1 if r == 0 else int(rng.integers(1, length - 1))
    tokens[r, 0], tokens[r, 1:n], tokens[r, n] = vocab - 2, rng.integers(0, 9, n - 1), vocab - 1
  tokens[1, 1] = 0
  return tokens


def test_distinct_tokens_mark_exactly_the_multi_hot_ids_once_each():
  rng = np.random.default_rng(3)
  vocab = 64
  tokens = _captions(rng, 12, 10, vocab)
  distinct = np.asarray(losses.distinct_tokens(jnp.asarray(tokens)))
  dense = np.asarray(losses.multi_hot(jnp.asarray(tokens), vocab))
  for r in range(len(tokens)):
    marked = tokens[r][distinct[r]]
    assert len(set(marked)) == len(marked)  # each id once
    assert set(marked) == set(np.flatnonzero(dense[r]))


def test_sparse_class_loss_and_its_gradient_equal_the_dense_loss_and_numpy():
  rng = np.random.default_rng(4)
  vocab, batch = 64, 12
  tokens = _captions(rng, batch, 10, vocab)
  tokens[2, 1:3] = [vocab - 1, 0]  # a caption with no words (SOT EOT) and one ...
  idf = rng.random(vocab).astype(np.float32) * 3
  idf[[vocab - 2, vocab - 1, 5]] = 0.0  # ... whose only word has zero weight: the row adds 0
  tokens[3, 1:3] = [5, vocab - 1]
  logits = jnp.asarray(rng.normal(size=(batch, vocab)) * 3, jnp.float32)
  dense = losses.multi_hot(jnp.asarray(tokens), vocab)

  def sparse(z):
    return losses.sparse_idf_class_loss(z, *losses.class_targets(jnp.asarray(tokens)), idf)

  got, grad = jax.value_and_grad(sparse)(logits)
  want, want_grad = jax.value_and_grad(lambda z: losses.idf_class_loss(z, dense, idf))(logits)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got, ref.idf_class_loss(np.asarray(logits, np.float64),
                                                     np.asarray(dense, np.float64), idf),
                             rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  assert not np.asarray(grad)[3].any()  # the zero-weight row has no gradient


def test_idf_counts_from_sparse_captions_equal_the_dense_update_exactly():
  rng = np.random.default_rng(5)
  vocab = 64
  dense = sparse = IdfCounts.zeros(vocab)
  for _ in range(3):
    tokens = jnp.asarray(_captions(rng, 16, 10, vocab))
    dense = dense.update(losses.multi_hot(tokens, vocab))
    sparse = sparse.add_captions(*losses.class_targets(tokens))
  assert list(sparse.doc_freq.value()) == list(dense.doc_freq.value())
  assert sparse.num_docs.value() == dense.num_docs.value() == 48


def test_exact_count_is_exact_beyond_2_pow_40():
  start = 2**40 - 5
  count = ExactCount(jnp.array([start & 0xFFFFFFFF], jnp.uint32),
                            jnp.array([start >> 32], jnp.uint32))
  increments = [3, 4, 2**31 - 1, 16384, 2**32 - 1, 1]
  add = jax.jit(ExactCount.add)
  for inc in increments:
    count = add(count, jnp.array([inc], jnp.uint32))
  expected = start + sum(increments)
  assert count.value()[0] == expected
  # The guard: float32 counters could not have done this.
  assert int(np.float32(start) + np.float32(3)) != start + 3


def test_idf_counts_match_running_document_frequencies():
  rng = np.random.default_rng(1)
  vocab, batch = 50, 8
  counts = IdfCounts.zeros(vocab)
  df = np.zeros(vocab)
  docs = 0
  update = jax.jit(IdfCounts.update)
  for _ in range(5):
    targets = (rng.random((batch, vocab)) < 0.2).astype(np.float32)
    targets[:, 0] = 1.0  # a token in every caption, like SOT/EOT
    counts = update(counts, jnp.asarray(targets))
    df += targets.sum(0)
    docs += batch
    w = np.asarray(counts.weights())
    np.testing.assert_allclose(w, np.log((docs + 1) / (df + 1)), rtol=1e-5, atol=1e-6)
    assert w[0] == 0.0  # SOT/EOT-like tokens get exactly zero weight
  assert list(counts.doc_freq.value()) == list(df.astype(int))
  assert counts.num_docs.value() == docs


def test_idf_equals_official_running_mean_formula():
  # Official: cap_fq += mean_b(multi_hot) per step, num_samples += 1 per step,
  # w = log((num_samples + 1/B) / (cap_fq + 1/B)). Ours: log((docs + 1) / (df + 1)).
  rng = np.random.default_rng(2)
  batch, vocab, steps = 16, 30, 7
  cap_fq = np.zeros(vocab)
  counts = IdfCounts.zeros(vocab)
  for _ in range(steps):
    t = (rng.random((batch, vocab)) < 0.25).astype(np.float32)
    cap_fq += t.mean(0)
    counts = counts.update(jnp.asarray(t))
  official = np.log((steps + 1 / batch) / (cap_fq + 1 / batch))
  np.testing.assert_allclose(counts.weights(), official, rtol=1e-5, atol=1e-6)


def test_idf_counts_near_2_pow_40_give_accurate_weights():
  vocab = 4
  docs = 2**40 + 12345
  df = np.array([docs, 2**35 + 7, 1000, 0])
  counts = IdfCounts(
      ExactCount(jnp.asarray(df & 0xFFFFFFFF, jnp.uint32),
                        jnp.asarray(df >> 32, jnp.uint32)),
      ExactCount(jnp.uint32(docs & 0xFFFFFFFF), jnp.uint32(docs >> 32)))
  targets = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], np.float32)
  counts = counts.update(jnp.asarray(targets))
  df = df + targets.sum(0).astype(int)
  docs += 2
  assert list(counts.doc_freq.value()) == list(df)
  assert counts.num_docs.value() == docs
  np.testing.assert_allclose(counts.weights()[:vocab],
                             [math.log((docs + 1) / (d + 1)) for d in df], rtol=1e-6, atol=1e-6)
  assert float(counts.weights()[0]) == 0.0
