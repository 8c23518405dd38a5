"""SuperClass: the class head alone (no text tower), B/16, the paper's recipe (arg: platform=).

No text tower, so none of the paper's zero-shot or retrieval evals (evals= is accepted and has
nothing to add; a linear probe can be added to config.evals, docs/evaluation.md).
"""
from superclip_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, **config_lib.PAPER_ARGS)
  return config_lib.paper_recipe("superclass", "B/16", platform=arg.platform, evals=arg.evals)
