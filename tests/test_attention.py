"""Attention implementations (config.model.attention): the same function as the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from superclip_jax import attention, config_lib, models
from tests import np_reference as ref


def _qkv(seed=0, batch=2, length=9, heads=3, head_dim=8):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32) for _ in range(3)]


def _numpy_attention(q, k, v, causal):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  if causal:
    n = q.shape[1]
    logits = logits + np.triu(np.full((n, n), -np.inf), 1)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("implementation", ["xla", "jax", "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_every_cpu_implementation_matches_numpy_with_the_same_gradients(implementation, causal):
  q, k, v = _qkv()
  got = attention.dot_product_attention(q, k, v, causal=causal, implementation=implementation)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, causal), rtol=1e-5, atol=1e-6)

  def loss(impl):
    return lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(
        q, k, v, causal=causal, implementation=impl)))
  grads = jax.grad(loss(implementation), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_auto_picks_cudnn_only_where_it_runs_and_cudnn_elsewhere_is_a_clear_error():
  assert attention.resolve("auto", jnp.bfloat16, 64, backend="gpu") == "cudnn"
  assert attention.resolve("auto", jnp.float32, 64, backend="gpu") == "xla"  # cuDNN: 16-bit
  assert attention.resolve("auto", jnp.bfloat16, 36, backend="gpu") == "xla"  # not 8k
  assert attention.resolve("auto", jnp.bfloat16, 160, backend="gpu") == "xla"  # over 128
  assert attention.resolve("auto", jnp.bfloat16, 64, backend="cpu") == "xla"
  assert attention.resolve("auto", jnp.bfloat16, 64, backend="tpu") == "xla"
  with pytest.raises(ValueError, match="config.model.attention='cudnn' needs an NVIDIA GPU"):
    attention.resolve("cudnn", jnp.bfloat16, 64, backend="cpu")
  with pytest.raises(ValueError, match=r"config.model.attention='flash'.*'cudnn'"):
    attention.resolve("flash", jnp.bfloat16, 64)
  config = config_lib.base_config()
  config.model.attention = "cudnn"
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="config.model.attention='cudnn'"):
      config_lib.validate(config)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_model_is_the_same_function_under_every_cpu_implementation(scan_layers):
  """Both towers (the text one causal) against the float64 reference; params identical."""
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((2, 12), np.int32)
  tokens[:, 0], tokens[:, 1:5], tokens[:, 5] = 49406, rng.integers(1, 300, (2, 4)), 49407
  outs, grads = {}, {}
  for impl in ("xla", "jax"):
    model = models.SuperCLIP(variant="mu/8", image_size=32, context_length=12,
                             scan_layers=scan_layers, attention=impl)
    params = model.init(jax.random.key(0), images, tokens)["params"]
    outs[impl] = model.apply({"params": params}, images, tokens)
    grads[impl] = jax.grad(lambda p, m=model: jnp.sum(
        m.apply({"params": p}, images, tokens)["ztxt"] ** 3))(params)
    if impl == "xla":
      first = params
    else:  # same parameter tree and values: export and import cannot tell them apart
      assert jax.tree.structure(params) == jax.tree.structure(first)
      assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, first)))
  for key in ("zimg", "ztxt", "class_logits"):
    np.testing.assert_allclose(outs["jax"][key], outs["xla"][key], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads["jax"], grads["xla"])
  if not scan_layers:  # the text tower, causal, against the float64 reference
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), first)
    expected = ref.normalize(ref.text(tokens, p["text"], heads=2))
    np.testing.assert_allclose(outs["jax"]["ztxt"], expected, rtol=1e-4, atol=1e-5)
