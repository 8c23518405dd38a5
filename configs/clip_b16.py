"""The CLIP baseline: B/16 with the paper's recipe and no class head."""
from superclip_jax import config_lib


def get_config(arg=None):
  del arg
  return config_lib.paper_recipe("clip", "B/16")
