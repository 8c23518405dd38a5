"""FSDP over 8 host devices: same losses as one device, and 1/8 of the bytes per device.

Runs in a subprocess (XLA_FLAGS must be set before jax starts).
"""
import textwrap

from tests import cpu_devices

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from superclip_jax import sharding, train_state, train_step
    from tests.test_train import fixed_batch, tiny_config
    assert jax.device_count() == 8

    def run(config, devices):
      mesh = sharding.make_mesh(config.mesh, devices)
      f = train_state.StateFactory(config, mesh)
      step = jax.jit(train_step.make_train_step(config, f.model, f.tx, f.schedule, mesh),
                     in_shardings=(f.shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(f.shardings, sharding.replicated(mesh)), donate_argnums=0)
      state, losses = f.create(), []
      for seed in range(3):
        state, m = step(state, jax.device_put(fixed_batch(config, seed),
                                              sharding.batch_sharding(mesh)))
        losses.append(float(m["loss"]))
      return state, losses

    config = tiny_config(sharding_rules=((".*", "fsdp"),))
    config.mesh.data, config.mesh.fsdp = 1, 1
    _, single = run(config, jax.devices()[:1])
    for data, fsdp in [(2, 4), (1, 8)]:
      config.mesh.data, config.mesh.fsdp = data, fsdp
      state, losses = run(config, jax.devices())
      np.testing.assert_allclose(losses, single, rtol=2e-4)

    # data=1, fsdp=8: every device holds ~1/8 of params + optimizer state.
    total = per_device = 0
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
      total += leaf.nbytes
      per_device += leaf.addressable_shards[0].data.nbytes
    assert per_device <= 1.05 * total / 8, (per_device, total)
    print("OK", per_device / total)

    # A batch the devices cannot split is refused before anything compiles.
    try:
      sharding.check_batch(12, sharding.make_mesh(config.mesh))
    except ValueError as e:
      assert "divisible by the number of devices (8)" in str(e)
    else:
      raise AssertionError("no error")
""")


def test_fsdp_matches_single_device_and_shards_memory():
  assert "OK" in cpu_devices.run_script(SCRIPT, devices=8).stdout  # the script asserts
