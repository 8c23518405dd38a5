"""SuperCLIP ViT-B/16, the paper's recipe: 512M samples at global batch 16,384 (31,250 steps).

  python -m superclip_jax.main --config=configs/b16.py --workdir=DIR
  python -m superclip_jax.main --config=configs/b16.py:mode=clip --workdir=DIR
"""
from superclip_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, mode="superclip", variant="B/16", contrastive="softmax")
  return config_lib.paper_recipe(arg.mode, arg.variant, arg.contrastive)
