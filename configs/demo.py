"""The built-in demo: a small SuperCLIP on procedurally rendered shapes; CPU, minutes.

  python -m superclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
  python -m superclip_jax.main --config=configs/demo.py:mode=clip --workdir=/tmp/demo_clip
  python -m superclip_jax.main --config=configs/demo.py --config.total_steps=20 --workdir=...

Your own data with this small model (docs/data.md, docs/evaluation.md): the evals read the demo
unless retargeted, --config.evals.zeroshot.data='folder:/data/test', or left out, with
--config=configs/demo.py:evals=none (or evals=zeroshot: that one alone).
"""
import ml_collections

from superclip_jax import config_lib, models

# The demo's evals (config arg `evals=`, '+'-joined; 'none' for neither). `data='demo'` reads
# the built-in shapes; set it to your own (a spec string, docs/evaluation.md) from the command
# line. num_examples: None = all (the demo renders 512); an int field settable from flags.
DEMO_EVALS = ("zeroshot", "retrieval")
# Also on request (evals=zeroshot+probe): linear probes of the image tower's mean patch token
# (what the class head sees) for the main object's shape and position, fitted on 2,048
# training images: what the tower encodes, apart from what the text tower matches.
EXTRA_EVALS = ("probe",)
PROBE_LABELS = ("shape", "position")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, mode="superclip", contrastive="softmax", long_captions=False,
                             evals="+".join(DEMO_EVALS))
  c = config_lib.base_config()
  c.seed = 0
  c.model.mode = arg.mode
  c.model.variant = "demo/8"  # width 128, 3 layers; text width 96, 2 layers
  c.model.image_size = 48
  c.model.context_length = 40  # the long demo captions need at most 36 tokens
  c.model.dtype = "float32"  # bf16 matmuls are slow on CPUs
  c.loss.contrastive = arg.contrastive
  if arg.contrastive == "sigmoid":
    c.model.logit_bias = -10.0
    c.model.logit_scale_init = 2.302585  # ln 10
  c.input.data = "demo"
  c.input.batch_size = 128
  c.input.demo.long_captions_for_head = arg.long_captions
  c.total_steps = 1200
  c.lr = 1e-3
  c.wd = 0.1
  c.schedule.warmup_steps = 100
  c.log_training_steps = 50
  c.ckpt_steps = 200
  chosen = config_lib.chosen_evals(arg.evals, DEMO_EVALS + EXTRA_EVALS)
  for name in chosen:
    if name == "probe":  # image features only: every mode
      for label in PROBE_LABELS:
        c.evals[f"probe_{label}"] = dict(
            type="linear_probe", every_steps=400, label=label, features="patch_mean",
            train_data="demo:train", test_data="demo:zeroshot", num_train_examples=2048,
            batch_size=256)
    elif models.has_text(arg.mode):  # zero-shot and retrieval embed text
      c.evals[name] = dict(type=name, every_steps=400, data="demo", batch_size=256,
                           num_examples=ml_collections.FieldReference(None, field_type=int))
  return c
