"""SuperCLIP ViT-L/16 with the B/16 schedule (as the paper); args and data as configs/b16.py."""
from superclip_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, mode="superclip", contrastive="softmax",
                             **config_lib.PAPER_ARGS)
  return config_lib.paper_recipe(arg.mode, "L/16", arg.contrastive, platform=arg.platform,
                                 evals=arg.evals)
