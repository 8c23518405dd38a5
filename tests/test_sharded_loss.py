"""Contrastive losses over a device mesh equal the single-device ones, without [B, B] logits.

Runs in a subprocess with 8 host devices (XLA_FLAGS must be set before jax starts).
"""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from superclip_jax import losses, sharding
    import ml_collections
    assert jax.device_count() == 8
    B, D = 32, 16
    rng = np.random.default_rng(0)
    def unit(x): return x / np.linalg.norm(x, axis=-1, keepdims=True)
    zi = jnp.asarray(unit(rng.normal(size=(B, D))), jnp.float32)
    zt = jnp.asarray(unit(rng.normal(size=(B, D))), jnp.float32)
    for data, fsdp in [(8, 1), (2, 4), (1, 8)]:
      mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)))
      bs = sharding.batch_sharding(mesh)
      zis, zts = jax.device_put(zi, bs), jax.device_put(zt, bs)
      for kind, out_extra in [("softmax", {}), ("sigmoid", {"logit_bias": jnp.float32(-3.0)})]:
        def loss(a, b, fn):
          out = {"zimg": a, "ztxt": b, "logit_scale": jnp.float32(7.0), **out_extra}
          return fn(out)
        ref = lambda o: losses.contrastive_loss(kind, o)
        shd = lambda o: losses.sharded_contrastive_loss(kind, o, mesh)
        want, want_g = jax.value_and_grad(loss, argnums=(0, 1))(zi, zt, ref)
        f = jax.jit(jax.value_and_grad(lambda a, b: loss(a, b, shd), argnums=(0, 1)))
        got, got_g = f(zis, zts)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for g1, g2 in zip(got_g, want_g):
          np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)
        hlo = f.lower(zis, zts).compile().as_text()
        assert f"f32[{B},{B}]" not in hlo, (kind, data, fsdp)  # no global logits anywhere
        assert f"f32[{B // 8},{B}]" in hlo  # local rows x global columns
    print("OK")
""")


def test_sharded_contrastive_losses_match_and_stay_local():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]
