"""The train step, optimizer rules and checkpoints on a tiny model (no input pipeline)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from superclip_jax import checkpoint, config_lib, optim, sharding, train_state, train_step


def tiny_config(mode="superclip", **overrides):
  c = config_lib.base_config()
  c.model.mode = mode
  c.model.variant = "mu/8"
  c.model.image_size = 32
  c.model.context_length = 12
  c.model.dtype = "float32"
  c.input.batch_size = 8
  c.total_steps = 30
  c.lr = 3e-3
  c.wd = 0.01
  c.schedule.warmup_steps = 2
  for k, v in overrides.items():
    c[k] = v
  return c


def fixed_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, ctx = config.input.batch_size, config.model.context_length
  tokens = np.zeros((b, ctx), np.int32)
  for i in range(b):
    n = rng.integers(3, ctx - 1)
    tokens[i, 0] = 49406
    tokens[i, 1:n] = rng.integers(1, 300, n - 1)
    tokens[i, n] = 49407
  s = config.model.image_size
  return {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "tokens": tokens,
          "class_tokens": tokens}


def _setup(config):
  mesh = sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  step = jax.jit(train_step.make_train_step(config, factory.model, factory.tx, factory.schedule))
  return factory, step


@pytest.mark.parametrize("mode,contrastive", [("superclip", "softmax"), ("clip", "softmax"),
                                              ("superclass", "softmax"),
                                              ("superclip", "sigmoid")])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(mode, contrastive):
  config = tiny_config(mode)
  config.loss.contrastive = contrastive
  if contrastive == "sigmoid":
    config.model.logit_bias = -10.0
  factory, step = _setup(config)
  state = factory.create()
  batch = fixed_batch(config)
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  assert int(state.step) == 15
  assert state.examples_seen.value() == 15 * config.input.batch_size
  if mode != "clip":
    assert state.idf.num_docs.value() == 15 * config.input.batch_size
    assert ("class_loss" in metrics) and (("contrastive_loss" in metrics) == (mode != "superclass"))


def test_idf_counts_update_before_the_weights_are_used():
  config = tiny_config()
  factory, step = _setup(config)
  state = factory.create()
  batch = fixed_batch(config)
  state, _ = step(state, batch)
  # After one batch: df of each id = number of captions containing it (up to EOT).
  expected = np.zeros(config.model.vocab_size, np.int64)
  for row in batch["class_tokens"]:
    eot = int(np.argmax(row))
    expected[np.unique(row[:eot + 1])] += 1
  np.testing.assert_array_equal(state.idf.doc_freq.value().astype(np.int64), expected)


def test_logit_scale_is_clamped_to_ln_100():
  params = {"logit_scale": jnp.float32(7.0), "x": jnp.ones(2)}
  assert float(optim.clamp_logit_scale(params)["logit_scale"]) == pytest.approx(np.log(100))
  params = {"logit_scale": jnp.float32(-1.0)}
  assert float(optim.clamp_logit_scale(params)["logit_scale"]) == 0.0


def test_weight_decay_follows_the_official_exemptions():
  config = tiny_config()
  factory, _ = _setup(config)
  params = factory.abstract.params
  mask = optim.weight_decay_mask(config, params)
  names = jax.tree_util.tree_flatten_with_path(mask)[0]
  shapes = jax.tree.leaves(params)
  flat = {}
  for (path, m), shape in zip(names, shapes):
    name = "/".join(str(k.key) for k in path)
    flat[name] = m
    # The official rule: exempt if ndim < 2 or the name contains bn / ln / bias / logit_scale.
    exempt = (len(shape.shape) < 2 or any(w in name for w in ("bn", "ln", "bias", "logit_scale")))
    assert m == (0.0 if exempt else 1.0), name
  assert flat["visual/conv1/kernel"] == 1.0
  assert flat["visual/positional_embedding"] == 1.0  # 2-D: decayed, as the official code
  assert flat["visual/class_embedding"] == 0.0  # 1-D: exempt
  assert flat["class_head/dense/kernel"] == 1.0
  assert flat["class_head/ln/scale"] == 0.0
  assert flat["text/token_embedding/embedding"] == 1.0


def test_frozen_groups_do_not_move():
  config = tiny_config(frozen=("visual/.*",))
  factory, step = _setup(config)
  state = factory.create()
  before = jax.tree.map(np.asarray, state.params)
  state, _ = step(state, fixed_batch(config))
  after = jax.tree.map(np.asarray, state.params)
  for a, b in zip(jax.tree.leaves(before["visual"]), jax.tree.leaves(after["visual"])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(before["text"]["positional_embedding"],
                            after["text"]["positional_embedding"])


def _flops(compiled):
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_frozen_tower_runs_forward_only(accum_steps):
  """LiT: a frozen image tower costs no backward pass (XLA's own FLOP count of the compiled
  step), and the trained tower moves exactly as when the frozen gradient is computed and then
  dropped by the optimizer (the behaviour before `stop_frozen`)."""
  config = tiny_config(frozen=("visual/.*",), accum_steps=accum_steps)
  factory = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
  state, batch = factory.create(), fixed_batch(config)
  frozen_step = jax.jit(train_step.make_train_step(config, factory.model, factory.tx,
                                                   factory.schedule))
  # The same optimizer (frozen leaves set to zero), but the frozen tower differentiated.
  dropped_step = jax.jit(functools.partial(
      train_step.train_step, loss=train_step.StepLoss(
          factory.model, config.loss.contrastive, config.loss.class_weight),
      tx=factory.tx, schedule=factory.schedule, use_idf=True,
      batch_size=config.input.batch_size, accum_steps=accum_steps))
  frozen_flops = _flops(frozen_step.lower(state, batch).compile())
  dropped_flops = _flops(dropped_step.lower(state, batch).compile())
  model = factory.model
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
  vision_forward = _flops(forward.lower(state.params, batch["image"]).compile())
  # A backward pass costs about twice its forward (input and weight gradients). With
  # accumulation the micro-batches are a loop, whose body XLA's cost analysis counts once.
  saved = dropped_flops - frozen_flops
  assert saved > 1.5 * vision_forward / accum_steps, (saved, vision_forward, frozen_flops,
                                                      dropped_flops)

  after_frozen, m_frozen = frozen_step(state, batch)
  after_dropped, m_dropped = dropped_step(state, batch)
  np.testing.assert_allclose(float(m_frozen["loss"]), float(m_dropped["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(after_frozen.params), jax.tree.leaves(after_dropped.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(state.params["visual"]),
                  jax.tree.leaves(after_frozen.params["visual"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_batch_is_dropped_and_state_stays_good():
  config = tiny_config()
  factory, step = _setup(config)
  state = factory.create()
  state, _ = step(state, fixed_batch(config, seed=1))  # non-zero moments to keep
  good = jax.tree.map(np.asarray, (state.params, state.opt_state))
  batch = fixed_batch(config)
  batch["image"][0, 0, 0, 0] = np.nan
  state, metrics = step(state, batch)
  assert float(metrics["nonfinite"]) == 1.0
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert int(state.step) == 2
  assert state.idf.num_docs.value() == config.input.batch_size  # only the good batch counted



def test_bfloat16_compute_keeps_float32_params_and_optimizer_state():
  """Mixed precision: bf16 matmuls, f32 parameters and Adam moments, the f32 run's loss."""
  losses_by_dtype = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config()
    config.model.dtype = dtype
    factory, step = _setup(config)
    state = factory.create()
    batch = fixed_batch(config)
    if dtype == "bfloat16":
      assert "bf16" in step.lower(state, batch).as_text()  # the compute really is bf16
    state, metrics = step(state, batch)
    losses_by_dtype[dtype] = float(metrics["loss"])
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
  np.testing.assert_allclose(losses_by_dtype["bfloat16"], losses_by_dtype["float32"], rtol=2e-2)

@pytest.mark.parametrize("mode", ["superclip", "clip"])
def test_train_step_updates_optimizer_state_in_place(mode):
  """The compiled step copies no parameter or optimizer-moment buffer: each is read and
  rewritten once (a select between the old and the new state used to cost two full copies of
  mu and nu per step, the largest part of the class head's step-time overhead on CPU)."""
  import re
  config = tiny_config(mode)
  mesh = sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  step = jax.jit(train_step.make_train_step(config, factory.model, factory.tx, factory.schedule),
                 donate_argnums=0)
  hlo = step.lower(factory.create(), fixed_batch(config)).compile().as_text()
  copies = re.findall(r"= (\S+) copy\((%?state_(?:params|opt_state)\S*)\)", hlo)
  # Scalars may be copied (the update's finiteness check reads logit_scale and Adam's count
  # before the in-place update): bytes, not buffers.
  state_copies = [(shape, name) for shape, name in copies if not shape.endswith("[]")]
  assert not state_copies, state_copies
  assert re.search(r"conditional\(", hlo)  # the skip-on-non-finite branch is still there


def test_checkpoint_save_restore_gives_identical_state(tmp_path):
  config = tiny_config()
  factory, step = _setup(config)
  state = factory.create()
  for seed in range(3):
    state, _ = step(state, fixed_batch(config, seed))
  checkpoint.write_config(str(tmp_path), config)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  ckpt.save(3, state)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  assert ckpt.latest_step() == 3
  restored = ckpt.restore(factory.abstract_with_shardings())
  ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state, restored)
  # And training continues identically from both.
  s1, m1 = step(state, fixed_batch(config, 9))
  s2, m2 = step(restored, fixed_batch(config, 9))
  assert float(m1["loss"]) == float(m2["loss"])
  cfg, params, idf, loaded_step = checkpoint.load_params(str(tmp_path))
  assert loaded_step == 3  # the latest, which export records in its manifest
  assert cfg.model.variant == "mu/8"
  np.testing.assert_array_equal(params["visual"]["proj"],
                                np.asarray(state.params["visual"]["proj"]))
  assert idf["num_docs"] == 3 * config.input.batch_size


def test_config_validation_names_the_problem():
  config = tiny_config()
  config.loss.contrastive = "sigmoid"
  with pytest.raises(ValueError, match="logit_bias"):
    config_lib.validate(config)
  config = tiny_config(mode="superclipp")
  with pytest.raises(ValueError, match="superclipp"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="Unknown config arg 'mdoe'"):
    config_lib.parse_arg("mdoe=clip", mode="superclip")


def test_schedule_matches_openclip_cosine_lr():
  import math
  config = tiny_config(total_steps=100, lr=1e-3)
  config.schedule.warmup_steps = 10
  schedule = optim.make_schedule(config)
  for step in [0, 5, 9, 10, 50, 99, 100]:
    if step < 10:
      expected = 1e-3 * (step + 1) / 10
    else:
      expected = 0.5 * (1 + math.cos(math.pi * (step - 10) / 90)) * 1e-3
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9), step
