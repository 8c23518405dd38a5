"""The built-in demo: a small SuperCLIP on procedurally rendered shapes; CPU, minutes.

  python -m superclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
  python -m superclip_jax.main --config=configs/demo.py:mode=clip --workdir=/tmp/demo_clip
  python -m superclip_jax.main --config=configs/demo.py --config.total_steps=20 --workdir=...
"""
from superclip_jax import config_lib, models


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, mode="superclip", contrastive="softmax", long_captions=False)
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
  if models.has_text(arg.mode):  # both evaluations embed text
    c.evals.zeroshot = dict(type="zeroshot", every_steps=400, num_examples=512, batch_size=256)
    c.evals.retrieval = dict(type="retrieval", every_steps=400, num_examples=512,
                             batch_size=256)
  return c
