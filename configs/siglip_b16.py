"""SuperCLIP with the SigLIP (sigmoid) contrastive loss, B/16, the paper's recipe (args:
platform=, evals=)."""
from superclip_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, **config_lib.PAPER_ARGS)
  return config_lib.paper_recipe("superclip", "B/16", contrastive="sigmoid",
                                 platform=arg.platform, evals=arg.evals)
