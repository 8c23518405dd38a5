import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from superclip_jax import models
from tests import np_reference as ref

B16_OPENCLIP_PARAMS = 149_620_737
HEAD_PARAMS = 768 * 49408 + 49408 + 2 * 768


def _count(mode, variant="B/16", **kw):
  m = models.SuperCLIP(mode=mode, variant=variant, **kw)
  shapes = jax.eval_shape(m.init, {"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 77), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_b16_parameter_counts_match_openclip():
  assert _count("clip") == B16_OPENCLIP_PARAMS
  assert _count("superclip") == B16_OPENCLIP_PARAMS + HEAD_PARAMS
  assert _count("superclip", logit_bias=-10.0) == B16_OPENCLIP_PARAMS + HEAD_PARAMS + 1


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown model variant 'X/16'"):
    models.parse_variant("X/16")


def _tiny(mode="superclip", seed=0):
  """mu/8 at 32 px, with every parameter randomised (LayerNorms too) so mistakes show."""
  model = models.SuperCLIP(mode=mode, variant="mu/8", image_size=32, context_length=12)
  params = model.init({"params": jax.random.key(seed)}, jnp.zeros((1, 32, 32, 3)),
                      jnp.zeros((1, 12), jnp.int32))["params"]
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(x) + rng.normal(0, 0.1, np.shape(x)).astype(np.float32) for x in leaves]
  return model, jax.tree.unflatten(treedef, leaves)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((3, 12), np.int32)
  for i, n in enumerate([3, 7, 10]):
    tokens[i, 0] = 49406
    tokens[i, 1:n] = rng.integers(1, 49000, n - 1)
    tokens[i, n] = 49407
  return images, tokens


def test_forward_matches_numpy_reference():
  model, params = _tiny()
  images, tokens = _inputs()
  out = model.apply({"params": params}, images, tokens)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  heads = models.VIT_SIZES["mu"].heads
  img, tok = ref.vision(images.astype(np.float64), p["visual"], 8, heads)
  txt = ref.text(tokens, p["text"], models.TEXT_SIZES["mu"].heads)
  np.testing.assert_allclose(out["zimg"], ref.normalize(img), rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(out["ztxt"], ref.normalize(txt), rtol=2e-4, atol=2e-5)
  # The head sees the mean of the patch tokens after ln_post, CLS excluded.
  logits = ref.class_head(tok[:, 1:].mean(1), p["class_head"])
  np.testing.assert_allclose(out["class_logits"], logits, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(out["logit_scale"], np.exp(p["logit_scale"]), rtol=1e-6)


def test_head_ignores_the_cls_token():
  model, params = _tiny()
  images, tokens = _inputs()
  base = model.apply({"params": params}, images, tokens)
  _, patch_mean = model.apply({"params": params}, images, method="encode_image")
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  _, tok = ref.vision(images.astype(np.float64), p["visual"], 8, models.VIT_SIZES["mu"].heads)
  np.testing.assert_allclose(patch_mean, tok[:, 1:].mean(1), rtol=2e-4, atol=2e-5)
  assert not np.allclose(patch_mean, tok.mean(1), atol=1e-3)  # CLS would change it
  np.testing.assert_allclose(
      model.apply({"params": params}, patch_mean, method="classify"), base["class_logits"],
      rtol=1e-5, atol=1e-5)


def test_text_is_causal_and_pools_at_eot():
  model, params = _tiny()
  _, tokens = _inputs()
  z = model.apply({"params": params}, tokens, method="encode_text")
  after = tokens.copy()
  after[0, 5:] = 123  # after EOT (position 3) and below 49407: must not matter
  np.testing.assert_allclose(model.apply({"params": params}, after, method="encode_text")[0],
                             z[0], rtol=1e-6, atol=1e-6)
  before = tokens.copy()
  before[0, 1] = 777  # before EOT: must matter
  assert not np.allclose(model.apply({"params": params}, before, method="encode_text")[0], z[0])


def test_modes_have_the_right_outputs_and_parameters():
  images, tokens = _inputs()
  for mode, keys, has in [("clip", {"zimg", "ztxt", "logit_scale"}, {"text"}),
                          ("superclass", {"zimg", "class_logits"}, {"class_head"}),
                          ("superclip", {"zimg", "ztxt", "logit_scale", "class_logits"},
                           {"text", "class_head"})]:
    model, params = _tiny(mode)
    out = model.apply({"params": params}, images, tokens)
    assert set(out) == keys, mode
    assert has <= set(params), mode
    assert ("class_head" in params) == (mode != "clip")
    assert ("text" in params) == (mode != "superclass")


def test_patch_dropout_keeps_cls_and_a_fraction_of_patches():
  model = models.SuperCLIP(mode="superclip", variant="mu/8", image_size=32, context_length=12,
                           patch_dropout=0.5)
  images, tokens = _inputs()
  params = model.init({"params": jax.random.key(0)}, images, tokens)["params"]
  _, toks = model.apply({"params": params}, images, True, method=lambda m, x, t: m.visual(x, t),
                        rngs={"patch_dropout": jax.random.key(1)})
  assert toks.shape == (3, 1 + 8, 64)  # 16 patches, half kept, plus CLS
  _, toks_eval = model.apply({"params": params}, images, False,
                             method=lambda m, x, t: m.visual(x, t))
  assert toks_eval.shape == (3, 1 + 16, 64)


def test_quick_gelu_changes_the_activation():
  images, tokens = _inputs()
  m1 = models.SuperCLIP(mode="clip", variant="mu/8", image_size=32, context_length=12)
  m2 = models.SuperCLIP(mode="clip", variant="mu/8", image_size=32, context_length=12,
                        quick_gelu=True)
  params = m1.init({"params": jax.random.key(0)}, images, tokens)["params"]
  a = m1.apply({"params": params}, images, tokens)["zimg"]
  b = m2.apply({"params": params}, images, tokens)["zimg"]
  assert not np.allclose(a, b, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs_close():
  images, tokens = _inputs()
  model, params = _tiny()
  m16 = models.SuperCLIP(mode="superclip", variant="mu/8", image_size=32, context_length=12,
                         dtype=jnp.bfloat16)
  out32 = model.apply({"params": params}, images, tokens)
  out16 = m16.apply({"params": params}, images, tokens)
  assert out16["class_logits"].dtype == jnp.float32
  np.testing.assert_allclose(out16["zimg"], out32["zimg"], atol=0.05)


def test_bad_input_shapes_are_clear_errors():
  model, params = _tiny()
  with pytest.raises(ValueError, match=r"images must be \[batch, 32, 32, 3\]"):
    model.apply({"params": params}, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 12), jnp.int32))
  with pytest.raises(ValueError, match=r"tokens must be \[batch, 12\]"):
    model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 77), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_equals_flax_dense_in_parameters_outputs_and_gradients(dtype):
  # models.Dense only changes how the bias gradient is summed (ones @ g, float32).
  x = jax.random.normal(jax.random.key(1), (3, 5, 16))
  init = nn.initializers.normal(0.5)
  ours = models.Dense(24, dtype=dtype, kernel_init=init, bias_init=init)
  flax_dense = nn.Dense(24, dtype=dtype, kernel_init=init, bias_init=init)
  params = ours.init(jax.random.key(2), x)
  want = flax_dense.init(jax.random.key(2), x)
  chex.assert_trees_all_equal(params, want)  # same names, shapes, dtypes and initial values

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))
  got = jax.value_and_grad(loss(ours), argnums=(0, 1))(params, x)
  ref_value = jax.value_and_grad(loss(flax_dense), argnums=(0, 1))(params, x)
  assert ours.apply(params, x).dtype == flax_dense.apply(params, x).dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  chex.assert_trees_all_close(got, ref_value, rtol=tol, atol=tol)
