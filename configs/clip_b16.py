"""The CLIP baseline: B/16 with the paper's recipe and no class head (args: platform=, evals=)."""
from superclip_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, **config_lib.PAPER_ARGS)
  return config_lib.paper_recipe("clip", "B/16", platform=arg.platform, evals=arg.evals)
