"""SuperCLIP with the SigLIP (sigmoid) contrastive loss, B/16, the paper's recipe."""
from superclip_jax import config_lib


def get_config(arg=None):
  del arg
  return config_lib.paper_recipe("superclip", "B/16", contrastive="sigmoid")
