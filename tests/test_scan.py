"""config.model.scan_layers: one nn.scan over each tower's blocks, params stacked [layers, ...].

Given the same weights (`scan_layout.stack_layers`), the scanned model must compute what the
unrolled one does: forward outputs, gradients, a train step, the weight-decay mask, shardings,
exports and imports.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from superclip_jax import checkpoint, config_lib, convert, export, inference, losses, models
from superclip_jax import optim, param_rules, scan_layout, sharding, train_state, train_step
from tests import test_export
from tests.test_models import _count, _inputs, _tiny
from tests.test_train import fixed_batch, tiny_config


def scanned(model):
  return model.clone(scan_layers=True)


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_allclose(np.asarray(got[path]), np.asarray(want[path]), rtol=rtol,
                               atol=atol, err_msg="/".join(path))


def model_loss(model, params, images, tokens):
  """A scalar touching every output (contrastive + class head), for gradient checks."""
  out = model.apply({"params": params}, images, None if model.mode == "superclass" else tokens)
  total = 0.0
  if "ztxt" in out:
    total += losses.clip_softmax_loss(out["zimg"], out["ztxt"], out["logit_scale"])
  if "class_logits" in out:
    total += -jnp.mean(jax.nn.log_softmax(out["class_logits"])[:, :500])
  return total + jnp.sum(out["zimg"] ** 3)


@pytest.mark.parametrize("mode", models.MODES)
@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_forward_matches_unrolled(mode, remat_policy):
  model, params = _tiny(mode)
  model = model.clone(remat_policy=remat_policy)
  images, tokens = _inputs()
  run = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, images, tokens))(p)
  want = run(model, params)
  got = run(scanned(model), scan_layout.stack_layers(params))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_scanned_text_tower_is_causal():
  model, params = _tiny()
  model, params = scanned(model), scan_layout.stack_layers(params)
  _, tokens = _inputs()
  z = model.apply({"params": params}, tokens, method="encode_text")
  after = tokens.copy()
  after[0, 5:] = 123  # after EOT (position 3): must not matter
  np.testing.assert_allclose(model.apply({"params": params}, after, method="encode_text")[0],
                             z[0], rtol=1e-6, atol=1e-6)


def test_stack_unstack_round_trip_is_exact_and_matches_the_scanned_layout():
  model, params = _tiny()
  params = jax.tree.map(np.asarray, params)
  stacked = scan_layout.stack_layers(params)
  assert "resblocks_0" not in stacked["visual"]["transformer"]
  assert stacked["visual"]["transformer"]["resblocks"]["attn"]["in_proj"]["kernel"].shape == (
      2, 64, 192)
  assert isinstance(stacked["text"]["transformer"]["resblocks"]["ln_1"]["scale"], np.ndarray)
  test_export.assert_params_equal(scan_layout.unstack_layers(stacked), params)
  test_export.assert_params_equal(
      scan_layout.stack_layers(scan_layout.unstack_layers(stacked)), stacked)
  for i in range(2):  # layer i of the stack is block i
    np.testing.assert_array_equal(
        stacked["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"][i],
        params["visual"]["transformer"][f"resblocks_{i}"]["mlp"]["c_fc"]["kernel"])
  # The same tree (names, shapes, dtypes) as a scanned model's own init.
  images, tokens = _inputs()
  own = jax.eval_shape(scanned(model).init, jax.random.key(0), images, tokens)["params"]
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), own)
          == jax.tree.map(lambda x: (x.shape, x.dtype), stacked))
  # Abstract trees too (what StateFactory.abstract holds).
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
  assert jax.tree.map(lambda x: x.shape, scan_layout.stack_layers(abstract)) == jax.tree.map(
      lambda x: x.shape, own)
  with pytest.raises(ValueError, match="not numbered"):
    scan_layout.stack_layers({"resblocks_0": {"w": np.ones(1)}, "resblocks_2": {"w": np.ones(1)}})


def test_parameter_count_is_identical():
  assert _count("superclip", scan_layers=True) == _count("superclip")
  assert _count("clip", scan_layers=True) == _count("clip") == 149_620_737


def test_scanned_init_has_the_unrolled_per_layer_distributions():
  """Each layer is initialised separately (own RNG), with the unrolled model's std."""
  model = models.SuperCLIP(variant="mu/8", image_size=32, context_length=12)
  images, tokens = _inputs()
  unrolled = model.init(jax.random.key(0), images, tokens)["params"]
  stacked = scanned(model).init(jax.random.key(0), images, tokens)["params"]
  for tower in ("visual", "text"):
    blocks = stacked[tower]["transformer"]["resblocks"]
    for path in [("attn", "in_proj", "kernel"), ("attn", "out_proj", "kernel"),
                 ("mlp", "c_fc", "kernel"), ("mlp", "c_proj", "kernel")]:
      x = np.asarray(traverse_util.flatten_dict(blocks)[path])
      for i in range(x.shape[0]):
        ref = np.asarray(traverse_util.flatten_dict(
            unrolled[tower]["transformer"][f"resblocks_{i}"])[path])
        assert abs(x[i].std() / ref.std() - 1) < 0.15, (tower, path, i)
        assert abs(x[i].mean()) < 3 * ref.std() / np.sqrt(ref.size)
      assert not np.allclose(x[0], x[1])  # layers differ: each has its own RNG
    np.testing.assert_array_equal(blocks["ln_1"]["scale"], 1.0)
    np.testing.assert_array_equal(blocks["mlp"]["c_fc"]["bias"], 0.0)


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_gradients_match_unrolled(remat_policy):
  model, params = _tiny()
  model = model.clone(remat_policy=remat_policy)
  images, tokens = _inputs()
  grad = lambda m, p: jax.jit(jax.grad(lambda p: model_loss(m, p, images, tokens)))(p)
  want = grad(model, params)
  got = grad(scanned(model), scan_layout.stack_layers(params))
  assert_trees_close(scan_layout.unstack_layers(got), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("wd_mults", [None, ((".*", 1.0),)])
def test_weight_decay_mask_is_the_unrolled_mask_stacked(wd_mults):
  """With a leading [layers] axis LayerNorm scales and biases are 2-D; they stay exempt, also
  under rules that do not exempt them by name (only the ndim < 2 rule does)."""
  config = tiny_config()
  if wd_mults:
    config.wd_mults = wd_mults
  abstract = train_state.StateFactory(config, sharding.make_mesh(config.mesh)).abstract.params
  unrolled = optim.weight_decay_mask(config, abstract)
  config.model.scan_layers = True
  stacked = train_state.StateFactory(config, sharding.make_mesh(config.mesh)).abstract.params
  mask = optim.weight_decay_mask(config, stacked)
  want = traverse_util.flatten_dict(scan_layout.stack_layers(unrolled))
  got = traverse_util.flatten_dict(mask)
  assert set(got) == set(want)
  for path, m in got.items():
    assert isinstance(m, float)
    assert np.all(np.asarray(want[path]) == m), path
  blocks = mask["visual"]["transformer"]["resblocks"]
  assert blocks["ln_1"]["scale"] == 0.0 and blocks["attn"]["in_proj"]["bias"] == 0.0
  assert blocks["attn"]["in_proj"]["kernel"] == 1.0


def _padded_spec(shape, fsdp_size, stacked):
  spec = tuple(sharding._spec("fsdp", shape, fsdp_size, stacked))  # pylint: disable=protected-access
  return spec + (None,) * (len(shape) - len(spec))


def test_fsdp_never_splits_the_layer_axis():
  """B/16 on an 8-way FSDP axis: a stacked parameter is split where its per-layer slice is."""
  config = config_lib.base_config()
  shapes = {}
  for scan in (False, True):
    config.model.scan_layers = scan
    shapes[scan] = convert.param_shapes(models.model_from_config(config.model))
  per_layer = {}  # (tower path with 'resblocks', ...) -> the specs of its 12 layers
  for path, s in shapes[False].items():
    if any(p.startswith("resblocks_") for p in path):
      key = tuple("resblocks" if p.startswith("resblocks_") else p for p in path)
      per_layer.setdefault(key, set()).add(_padded_spec(s.shape, 8, False))
  stacked = [path for path in shapes[True] if scan_layout.is_stacked("/".join(path))]
  assert set(stacked) == set(per_layer) and len(stacked) == 2 * 12
  for path in stacked:
    shape = shapes[True][path].shape
    spec = _padded_spec(shape, 8, True)
    assert spec[0] is None, path  # the layer axis stays whole
    assert "fsdp" in spec, path  # every B/16 block parameter has a dimension divisible by 8
    assert {spec[1:]} == per_layer[path], path  # split like each of its layers
  # Outside the blocks nothing changes.
  for path, s in shapes[True].items():
    if path not in stacked:
      assert _padded_spec(s.shape, 8, False) == _padded_spec(shapes[False][path].shape, 8, False)


def test_fsdp_shardings_name_the_optimizer_moments_too():
  """tree_shardings on the whole train state: Adam's moments keep the layer axis whole too."""
  config = tiny_config(sharding_rules=((".*", "fsdp"),))
  config.model.scan_layers = True
  abstract = train_state.StateFactory(config, sharding.make_mesh(config.mesh)).abstract
  names = jax.tree.leaves(param_rules.tree_names(abstract))
  stacked = [(n, x) for n, x in zip(names, jax.tree.leaves(abstract)) if scan_layout.is_stacked(n)]
  assert any("/mu/" in n for n, _ in stacked) and any("/nu/" in n for n, _ in stacked)
  for n, x in stacked:
    # fsdp=2 divides the layer axis (2) and every other dim: never the layer axis.
    assert _padded_spec(np.shape(x), 2, True)[0] is None, n
    assert "fsdp" in _padded_spec(np.shape(x), 2, True), n


def test_one_train_step_matches_unrolled():
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  batch = fixed_batch(config)
  unrolled = train_state.StateFactory(config, mesh)
  state = unrolled.create()
  config.model.scan_layers = True
  stacked = train_state.StateFactory(config, mesh)
  state_s = stacked.create(params=scan_layout.stack_layers(jax.tree.map(np.asarray, state.params)))
  results = []
  for f, s in ((unrolled, state), (stacked, state_s)):
    step = jax.jit(train_step.make_train_step(f.config, f.model, f.tx, f.schedule))
    results.append(step(s, batch))
  (new, metrics), (new_s, metrics_s) = results
  for k in metrics:
    np.testing.assert_allclose(metrics_s[k], metrics[k], rtol=1e-5, err_msg=k)
  got, want = jax.tree.map(np.array, (scan_layout.unstack_layers(new_s.params), new.params))
  # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, rounding differences
  # in g show up magnified (an update is at most lr), so params are compared within lr / 100.
  # The key part of the in_proj bias has an exactly zero gradient (softmax ignores a constant
  # per query): there both gradients are pure rounding noise, compared within lr / 10.
  width = 64
  for tower in ("visual", "text"):
    for i in range(2):
      bias = (tower, "transformer", f"resblocks_{i}", "attn", "in_proj", "bias")
      g, w = (traverse_util.flatten_dict(t).get(bias) for t in (got, want))
      np.testing.assert_allclose(g[width:2 * width], w[width:2 * width], atol=config.lr / 10)
      for t in (g, w):
        t[width:2 * width] = 0.0
  assert_trees_close(got, want, rtol=1e-5, atol=config.lr / 100)
  # The Adam moments come out stacked like the params.
  mu_s = new_s.opt_state[0].mu
  assert mu_s["visual"]["transformer"]["resblocks"]["attn"]["in_proj"]["kernel"].shape == (
      2, 64, 192)


# ------------------------------------------------------------------------------------------
# Export and import: the scanned model's exports are the unrolled model's, bit for bit.

@pytest.fixture(scope="module")
def weights():
  model = test_export.tiny()
  return model, test_export.random_params(model)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_of_scanned_equals_unrolled(weights, fmt):
  model, params = weights
  want = export.export_files(params, model, fmt)
  got = export.export_files(scan_layout.stack_layers(params), scanned(model), fmt)
  assert set(got) == set(want)
  for name, content in want.items():
    if isinstance(content, str):
      assert got[name] == content, name
      continue
    assert set(got[name]) == set(content), name
    for key, value in content.items():
      assert got[name][key].dtype == value.dtype and np.array_equal(got[name][key], value), key


@pytest.mark.parametrize("fmt", ["openclip", "superclip", "hf"])
def test_import_into_scanned_is_the_unrolled_import_stacked(weights, fmt):
  model, params = weights
  if fmt == "hf":
    state_dict = convert.to_hf(params, model)[0]
    state_dict.update(convert.head_state_dict(params, model))
  else:
    state_dict = getattr(convert, f"to_{fmt}")(params, model)
  want = convert.from_layout(state_dict, model, fmt)
  got = convert.from_layout(state_dict, scanned(model), fmt)
  test_export.assert_params_equal(got, scan_layout.stack_layers(want))


def test_scanned_export_loads_in_openclip(weights, tmp_path):
  pytest.importorskip("open_clip")
  model, params = weights
  case = test_export.Case.__new__(test_export.Case)
  case.name, case.model, case.params = "mu8-scan", scanned(model), scan_layout.stack_layers(params)
  case.images, case.tokens = test_export.make_inputs(model)
  case.ref = test_export.jax_reference(case.model, case.params, case.images, case.tokens)
  export.write_export(case.params, case.model, "openclip", tmp_path)
  test_export.check_openclip_dir(tmp_path, case)


def test_init_from_torch_into_scanned(weights, tmp_path):
  model, params = weights
  export.write_export(params, model, "superclip", tmp_path)
  init = scan_layout.stack_layers(jax.tree.map(np.zeros_like, params))
  got = convert.load_torch_checkpoint(tmp_path / "superclip_model.safetensors", scanned(model),
                                      init)
  test_export.assert_params_equal(got, scan_layout.stack_layers(params))


def test_scanned_checkpoint_exports_and_serves(tmp_path):
  """A scan_layers run's workdir: load_params -> export equals the unrolled export;
  inference.load computes the model's embeddings."""
  config = tiny_config()
  config.model.scan_layers = True
  mesh = sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  state = factory.create()
  checkpoint.write_config(str(tmp_path), config)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config)
  ckpt.save(0, state)
  ckpt.close()
  cfg, params, _, _ = checkpoint.load_params(str(tmp_path))
  assert cfg.model.scan_layers is True
  assert params["visual"]["transformer"]["resblocks"]["ln_1"]["scale"].shape == (2, 64)
  model = models.model_from_config(cfg.model, dtype=jnp.float32)
  got = convert.to_openclip(params, model)
  want = convert.to_openclip(scan_layout.unstack_layers(params), model.clone(scan_layers=False))
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  served = inference.load(str(tmp_path), dtype="float32")
  images, tokens = _inputs()
  np.testing.assert_allclose(
      served.encode_image(images),
      model.apply({"params": params}, images, method="encode_image")[0], rtol=1e-5, atol=1e-6)
