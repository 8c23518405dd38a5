"""SuperClass: the class head alone (no text tower), B/16, the paper's recipe."""
from superclip_jax import config_lib


def get_config(arg=None):
  del arg
  return config_lib.paper_recipe("superclass", "B/16")
