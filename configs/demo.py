"""The built-in demo: a small SuperCLIP on procedurally rendered shapes; CPU, minutes.

  python -m superclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
  python -m superclip_jax.main --config=configs/demo.py:mode=clip --workdir=/tmp/demo_clip
  python -m superclip_jax.main --config=configs/demo.py:task=shapes --workdir=/tmp/shapes

Two tasks (config arg `task=`), both on the same generated images (data/demo.py):
- `position` (the default, ~1.5 min on 2 cores): every caption is 'a shape in the {pos}',
  batch 16, 16,384 samples. The setting of the study (docs/study.md, "Where the head helps")
  where the head matters most: SuperCLIP learns the position (zero-shot ~99%), CLIP trained
  the same way stays near chance (~20%).
- `shapes` (~10 min): the demo's captions name shape, colour, size and position of two
  objects; batch 128, 153,600 samples. SuperCLIP and CLIP learn colour alike here.

Your own data with this small model (docs/data.md, docs/evaluation.md): the evals read the demo
unless retargeted, --config.evals.zeroshot.data='folder:/data/test', or left out, with
--config=configs/demo.py:evals=none (or evals=zeroshot: that one alone).
"""
import ml_collections

from superclip_jax import config_lib, models

TASKS = ("position", "shapes")
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
  arg = config_lib.parse_arg(arg, task="position", mode="superclip", contrastive="softmax",
                             long_captions=False, evals="+".join(DEMO_EVALS))
  if arg.task not in TASKS:
    raise ValueError(f"Config arg task={arg.task!r}: use one of {', '.join(TASKS)}")
  c = config_lib.base_config()
  c.seed = 0
  c.model.mode = arg.mode
  c.model.image_size = 48
  c.model.context_length = 40  # the long demo captions need at most 36 tokens
  c.model.dtype = "float32"  # bf16 matmuls are slow on CPUs
  c.loss.contrastive = arg.contrastive
  if arg.contrastive == "sigmoid":
    c.model.logit_bias = -10.0
    c.model.logit_scale_init = 2.302585  # ln 10
  c.input.data = "demo"
  c.input.demo.long_captions_for_head = arg.long_captions
  c.wd = 0.1
  if arg.task == "position":  # docs/study.md: the short-caption grid's batch-16 cell
    c.model.variant = "mu/8"  # width 64, 2 layers; text width 64, 2 layers
    c.input.demo.templates = "a shape in the {pos}"
    c.input.batch_size = 16
    c.total_steps = 1024  # 16,384 samples
    c.lr = 2e-3
    c.schedule.warmup_steps = 85  # 8.3% of the steps, as the study's runs
    c.log_training_steps = 128
    c.ckpt_steps = 256
    eval_every = 512
  else:  # shapes: the built-in captions
    c.model.variant = "demo/8"  # width 128, 3 layers; text width 96, 2 layers
    c.input.batch_size = 128
    c.total_steps = 1200
    c.lr = 1e-3
    c.schedule.warmup_steps = 100
    c.log_training_steps = 50
    c.ckpt_steps = 200
    eval_every = 400
  chosen = config_lib.chosen_evals(arg.evals, DEMO_EVALS + EXTRA_EVALS)
  for name in chosen:
    if name == "probe":  # image features only: every mode
      for label in PROBE_LABELS:
        c.evals[f"probe_{label}"] = dict(
            type="linear_probe", every_steps=eval_every, label=label, features="patch_mean",
            train_data="demo:train", test_data="demo:zeroshot", num_train_examples=2048,
            batch_size=256)
    elif models.has_text(arg.mode):  # zero-shot and retrieval embed text
      c.evals[name] = dict(type=name, every_steps=eval_every, data="demo", batch_size=256,
                           num_examples=ml_collections.FieldReference(None, field_type=int))
  return c
