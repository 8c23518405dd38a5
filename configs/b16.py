"""SuperCLIP ViT-B/16, the paper's recipe: 512M samples at global batch 16,384 (31,250 steps).

The data is yours: name it, and the eval data, or the run stops at start-up saying which:
  python -m superclip_jax.main --config=configs/b16.py --workdir=DIR \
      --config.input.data='wds:gs://BUCKET/shards/{00000..04095}.tar' \
      --config.evals.zeroshot_imagenet.data=folder:/data/imagenet/val \
      --config.evals.retrieval_coco.data=tfds:coco_captions:test
Config args (after ':', joined by ','): mode=clip|superclass, variant=L/16, contrastive=sigmoid,
platform=tpu-v5e-256|gpu-h100x8 (config_lib.PLATFORMS), evals=imagenet+coco|imagenet|coco|none.
"""
from superclip_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, mode="superclip", variant="B/16", contrastive="softmax",
                             **config_lib.PAPER_ARGS)
  return config_lib.paper_recipe(arg.mode, arg.variant, arg.contrastive,
                                 platform=arg.platform, evals=arg.evals)
