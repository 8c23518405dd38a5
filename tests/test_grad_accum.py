"""Gradient accumulation (config.accum_steps): the same step as the full batch, all negatives kept.

The reference is always the unaccumulated step (accum_steps=1) on the same global batch, or a
direct autodiff of the documented micro-batch computation.
"""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from superclip_jax import config_lib, losses, sharding, train_state, train_step
from tests import cpu_devices
from tests.test_train import fixed_batch, tiny_config


def _config(mode="superclip", contrastive="softmax", accum_steps=1, batch_size=16):
  config = tiny_config(mode)
  config.input.batch_size = batch_size
  config.accum_steps = accum_steps
  config.loss.contrastive = contrastive
  if contrastive == "sigmoid":
    config.model.logit_bias = -10.0
  return config


def _sgd_step(config):
  """The train step with plain SGD at lr 1, so that params_before - params_after = gradient."""
  factory = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
  tx = optax.sgd(1.0)
  step = jax.jit(train_step.make_train_step(config, factory.model, tx, factory.schedule))
  state = factory.create()
  return state.replace(opt_state=tx.init(state.params)), step


def _assert_trees_close(got, want, rtol=2e-5):
  """Leaf by leaf, to rtol of each leaf's largest magnitude (float rounding of sums)."""
  for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    w, g = np.asarray(w), np.asarray(g)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(np.max(np.abs(w))),
                               err_msg=jax.tree_util.keystr(path))


def _gradient_and_metrics(config, batch):
  state, step = _sgd_step(config)
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, batch)
  grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, state.params)
  return grads, jax.device_get(metrics)


@pytest.mark.parametrize("mode,contrastive", [
    ("superclip", "softmax"), ("superclip", "sigmoid"), ("clip", "softmax"),
    ("clip", "sigmoid"), ("superclass", "softmax")])
def test_accumulated_gradient_and_metrics_equal_the_full_batch(mode, contrastive):
  batch = fixed_batch(_config(mode, contrastive))
  want_grads, want = _gradient_and_metrics(_config(mode, contrastive, accum_steps=1), batch)
  got_grads, got = _gradient_and_metrics(_config(mode, contrastive, accum_steps=4), batch)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  _assert_trees_close(got_grads, want_grads)
  if mode != "superclass":  # the direct logit_scale gradient is counted once, not k times
    assert abs(float(want_grads["logit_scale"])) > 1e-3


def test_adamw_step_idf_counts_and_nonfinite_batches_with_accumulation():
  """One real (AdamW) step: same params and exactly the same IDF counts as the full batch;
  then a NaN batch through the accumulated step is dropped as without accumulation."""
  batch = fixed_batch(_config())
  results = []
  for k in (1, 4):
    config = _config(accum_steps=k)
    factory = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
    step = jax.jit(train_step.make_train_step(config, factory.model, factory.tx, factory.schedule))
    state, metrics = step(factory.create(), batch)
    results.append((state, jax.device_get(metrics)))
  (want, want_m), (got, got_m) = results
  # Adam's first update is lr * g / (|g| + eps): an entry of g near eps (1e-6) turns float
  # rounding of g into a change of a few % of lr (1.5e-3 here). So: almost every entry equal
  # to 1e-6 (here all but ~3e-5 of them), all within 10% of lr; the gradients themselves are
  # compared in the test above.
  want_p = np.concatenate([np.ravel(a) for a in jax.tree.leaves(want.params)])
  got_p = np.concatenate([np.ravel(a) for a in jax.tree.leaves(got.params)])
  np.testing.assert_allclose(got_p, want_p, rtol=1e-5, atol=1.5e-4)
  assert np.mean(np.abs(got_p - want_p) > 1e-6 + 1e-5 * np.abs(want_p)) < 1e-4
  np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-5)
  expected_df = np.zeros(config.model.vocab_size, np.int64)
  for row in batch["class_tokens"]:
    expected_df[np.unique(row[:int(np.argmax(row)) + 1])] += 1
  np.testing.assert_array_equal(got.idf.doc_freq.value().astype(np.int64), expected_df)
  np.testing.assert_array_equal(got.idf.doc_freq.value(), want.idf.doc_freq.value())
  assert got.idf.num_docs.value() == want.idf.num_docs.value() == 16
  assert got.examples_seen.value() == 16 and int(got.step) == 1

  good = jax.tree.map(np.asarray, got.params)
  bad = fixed_batch(config, seed=1)
  bad["image"][5, 0, 0, 0] = np.nan  # in micro-batch 1 of 4
  state, metrics = step(got, bad)
  assert float(metrics["nonfinite"]) == 1.0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), good, state.params)
  assert int(state.step) == 2 and state.idf.num_docs.value() == 16
  assert state.examples_seen.value() == 32


def test_patch_dropout_uses_one_mask_per_micro_batch_in_both_passes():
  """With patch dropout the accumulated gradient is that of the k micro-batch forwards (RNG
  folded with the micro-batch index) scored together over the whole batch."""
  k = 4
  config = _config(accum_steps=k)
  config.model.patch_dropout = 0.5
  config.loss.use_idf = False  # uniform weights: the reference needs no IDF counts
  state, step = _sgd_step(config)
  batch = fixed_batch(config)
  factory = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def reference_loss(params):
    outs = []
    for i in range(k):
      rows = np.arange(i, 16, k)
      outs.append(factory.model.apply({"params": params}, batch["image"][rows],
                                      batch["tokens"][rows], train=True,
                                      rngs={"patch_dropout": jax.random.fold_in(step_rng, i)}))
    order = np.argsort(np.concatenate([np.arange(i, 16, k) for i in range(k)]))
    out = {key: jnp.concatenate([o[key] for o in outs])[order] for key in ("zimg", "ztxt")}
    out["logit_scale"] = outs[0]["logit_scale"]
    class_logits = jnp.concatenate([o["class_logits"] for o in outs])[order]
    targets = losses.multi_hot(batch["class_tokens"], config.model.vocab_size)
    return (losses.contrastive_loss("softmax", out)
            + losses.idf_class_loss(class_logits, targets, jnp.ones(config.model.vocab_size)))

  before = jax.tree.map(np.asarray, state.params)
  want_loss, want_grads = jax.value_and_grad(reference_loss)(state.params)
  new, metrics = step(state, batch)
  got_grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, new.params)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  _assert_trees_close(got_grads, want_grads)


def test_bad_accum_steps_are_refused_with_the_field_named():
  for value in (0, -2):
    with pytest.raises(ValueError, match="accum_steps"):
      config_lib.validate(_config(accum_steps=value))
  with pytest.raises(ValueError, match=r"batch_size=16 must be divisible by config.accum_steps=3"):
    config_lib.validate(_config(accum_steps=3))
  config_lib.validate(_config(accum_steps=4))  # fine


SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from superclip_jax import sharding, train_state, train_step
    from tests.test_train import fixed_batch, tiny_config
    assert jax.device_count() == 8

    def run(config, devices, steps=2):
      mesh = sharding.make_mesh(config.mesh, devices)
      sharding.check_batch(config.input.batch_size, mesh, config.accum_steps)
      f = train_state.StateFactory(config, mesh)
      step = jax.jit(train_step.make_train_step(config, f.model, f.tx, f.schedule, mesh),
                     in_shardings=(f.shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(f.shardings, sharding.replicated(mesh)), donate_argnums=0)
      state, history = f.create(), []
      batches = [jax.device_put(fixed_batch(config, seed), sharding.batch_sharding(mesh))
                 for seed in range(steps)]
      compiled = step.lower(state, batches[0]).compile()  # once: run it and read its HLO
      hlo = compiled.as_text()
      for batch in batches:
        state, m = compiled(state, batch)
        history.append({k: float(v) for k, v in jax.device_get(m).items()})
      return history, hlo

    config = tiny_config(sharding_rules=((".*", "fsdp"),))
    config.input.batch_size = 16
    config.mesh.data, config.mesh.fsdp = 1, 1
    single, _ = run(config, jax.devices()[:1])
    config.mesh.data, config.mesh.fsdp = 2, 4
    config.accum_steps = 2
    sharded, hlo = run(config, jax.devices())
    for want, got in zip(single, sharded):
      for key in ("loss", "contrastive_loss", "class_loss", "grad_norm", "logit_scale"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-4, err_msg=key)
    # Per device: its 2 rows of the batch, 1 row of each micro-batch; never the whole batch
    # of images (or a micro-batch of them), nor [batch, batch] logits.
    assert "f32[2,32,32,3]" in hlo and "f32[1,32,32,3]" in hlo
    for shape in ("f32[16,32,32,3]", "f32[8,32,32,3]", "f32[16,16]"):
      assert shape not in hlo, shape

    # A micro-batch the devices cannot split is refused before anything compiles.
    try:
      sharding.check_batch(16, sharding.make_mesh(config.mesh), 4)
    except ValueError as e:
      assert "accum_steps" in str(e) and "number of devices (8)" in str(e), e
    else:
      raise AssertionError("no error")
    print("OK")
""")


def test_fsdp_mesh_with_accumulation_matches_single_device():
  assert "OK" in cpu_devices.run_script(SCRIPT, devices=8).stdout  # the script asserts
