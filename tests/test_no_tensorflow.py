"""The core (configs, train state, train step, checkpoints, inference) runs without TensorFlow.

A subprocess where `import tensorflow` raises trains a tiny model for a few steps on synthetic
batches, saves and restores a checkpoint, and embeds an image and a caption through the
inference API; its losses must equal the same steps run here, with TensorFlow importable.
"""
import json

from tests import cpu_devices
from tests.test_train import _setup, fixed_batch, tiny_config

STEPS = 3

SCRIPT = r"""
import json, sys, tempfile
sys.modules["tensorflow"] = None  # `import tensorflow` (and tensorflow.*) now raises

import jax, numpy as np
from superclip_jax import checkpoint, config_lib, inference, train_state, train_step
from tests.test_train import _setup, fixed_batch, tiny_config

config = tiny_config()
config_lib.validate(config)
factory, step = _setup(config)
state = factory.create()
losses = []
for i in range(int(sys.argv[1])):
  state, metrics = step(state, fixed_batch(config, seed=i))
  losses.append(float(metrics["loss"]))

workdir = tempfile.mkdtemp()
checkpoint.write_config(workdir, config)
ckpt = checkpoint.Checkpointer(workdir, config)
ckpt.save(int(state.step), state)
ckpt.close()
model = inference.load(workdir)
restored = checkpoint.load_state(workdir)[2]
same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(state.params),
                    jax.device_get(restored.params))
assert all(jax.tree.leaves(same)), "restored params differ"
image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)
zimg = model.encode_image(np.stack([model.preprocess(image)]))
ztxt = model.encode_text(model.tokenize(["a red circle"]))
assert zimg.shape[0] == ztxt.shape[0] == 1 and np.all(np.isfinite(zimg))
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow" and sys.modules[m])
assert not loaded, loaded
print(json.dumps(losses))
print("OK")
"""


def test_core_trains_checkpoints_and_infers_without_tensorflow():
  r = cpu_devices.run_script(SCRIPT, devices=1, args=[STEPS], timeout=600)
  without_tf = json.loads(r.stdout.splitlines()[-2])

  config = tiny_config()
  factory, step = _setup(config)
  state = factory.create()
  expected = []
  for i in range(STEPS):
    state, metrics = step(state, fixed_batch(config, seed=i))
    expected.append(float(metrics["loss"]))
  assert without_tf == expected  # bitwise: the same program, TensorFlow or not
