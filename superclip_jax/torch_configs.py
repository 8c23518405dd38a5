"""The PyTorch side's model configs, built from our model and checked against it.

OpenCLIP's `model_cfg` (open_clip_config.json), the official SuperCLIP JSON (OpenCLIP's plus
`clstext_cfg`) and transformers' `CLIPConfig` (config.json): each format's builder sits beside
the checker that `load_torch_checkpoint` runs on a directory's config before reading weights.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from superclip_jax import models

# OpenAI's CLIP normalisation, what OpenCLIP and HF preprocessors default to.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model: names the parameter and says what differs."""


# ---------------------------------------------------------------------------------------------
# Architecture, as the PyTorch configs describe it.

@dataclasses.dataclass(frozen=True)
class Arch:
  size: str
  patch: int
  image_size: int
  vision: models.TowerSize
  text: Optional[models.TowerSize]  # None: mode='superclass'
  embed_dim: int
  vocab_size: int
  context_length: int
  has_head: bool
  head_blocks: int
  head_mlp_ratio: float
  quick_gelu: bool
  logit_bias: Optional[float]


def arch(model: models.SuperCLIP) -> Arch:
  """The sizes and options of `model` that the PyTorch configs and layouts spell out."""
  size, patch = models.parse_variant(model.variant)
  return Arch(
      size=size, patch=patch, image_size=model.image_size, vision=models.VIT_SIZES[size],
      text=models.TEXT_SIZES[model.text_size or size] if model.has_text else None,
      embed_dim=model.embed_dim or models.EMBED_DIMS[size], vocab_size=model.vocab_size,
      context_length=model.context_length, has_head=model.has_head,
      head_blocks=model.head_blocks, head_mlp_ratio=model.head_mlp_ratio,
      quick_gelu=model.quick_gelu, logit_bias=model.logit_bias if model.has_text else None)


# ---------------------------------------------------------------------------------------------
# OpenCLIP and the official SuperCLIP code.

def _num(x):
  """4.0 -> 4 so configs read like OpenCLIP's own JSON."""
  return int(x) if float(x).is_integer() else float(x)


def openclip_model_name(model) -> str:
  """OpenCLIP-style name: 'ViT-B-16', 'ViT-L-14-336', 'ViT-B-16-quickgelu'."""
  a = arch(model)
  name = f"ViT-{a.size}-{a.patch}"
  if a.image_size != 224:
    name += f"-{a.image_size}"
  return name + ("-quickgelu" if a.quick_gelu else "")


def openclip_model_cfg(model) -> dict:
  """OpenCLIP's `model_cfg` (as in its model_configs/*.json) for `CLIP(**model_cfg)`."""
  a = arch(model)
  if a.text is None:
    raise ValueError("mode='superclass' has no text tower; OpenCLIP's CLIP needs one "
                     "(export a 'superclip' or 'clip' model)")
  vision = {"image_size": a.image_size, "layers": a.vision.layers, "width": a.vision.width,
            "patch_size": a.patch}
  head_width = a.vision.width // a.vision.heads
  if head_width != 64:  # OpenCLIP's default; its heads = width // head_width
    vision["head_width"] = head_width
  if a.vision.mlp_ratio != 4.0:
    vision["mlp_ratio"] = _num(a.vision.mlp_ratio)
  text = {"context_length": a.context_length, "vocab_size": a.vocab_size,
          "width": a.text.width, "heads": a.text.heads, "layers": a.text.layers}
  if a.text.mlp_ratio != 4.0:
    text["mlp_ratio"] = _num(a.text.mlp_ratio)
  cfg = {"embed_dim": a.embed_dim, "quick_gelu": a.quick_gelu, "vision_cfg": vision,
         "text_cfg": text}
  if a.logit_bias is not None:
    cfg["init_logit_bias"] = a.logit_bias  # makes CLIP create its `logit_bias` parameter
  return cfg


def superclip_model_cfg(model) -> dict:
  """The official SuperCLIP config (e.g. SuperCLIP-ViT-B-16.json): OpenCLIP's, with the patch
  tokens returned by the vision tower and `clstext_cfg` describing the head."""
  a = arch(model)
  cfg = openclip_model_cfg(model)
  cfg["vision_cfg"]["output_tokens"] = True
  cfg["clstext_cfg"] = {"context_length": a.context_length, "vocab_size": a.vocab_size,
                        "layers": a.head_blocks, "mlp_ratio": _num(a.head_mlp_ratio)}
  return cfg


def preprocess_cfg(model) -> dict:
  """OpenCLIP's `preprocess_cfg`: resize shortest side (bicubic), centre crop, normalise."""
  return {"size": model.image_size, "mode": "RGB", "mean": list(IMAGE_MEAN),
          "std": list(IMAGE_STD), "interpolation": "bicubic", "resize_mode": "shortest"}


# OpenCLIP config options that change the computation; ours is the default of each.
_OPENCLIP_VISION_DEFAULTS = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
    "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "timm_model_name": None}
_OPENCLIP_TEXT_DEFAULTS = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
    "proj_type": "linear", "act_kwargs": None, "norm_kwargs": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "hf_model_name": None,
    "hf_tokenizer_name": None}


def check_openclip_cfg(model_cfg: dict, model) -> None:
  """Raises CheckpointMismatchError, naming the field, when an OpenCLIP/SuperCLIP model config
  describes a different computation than `model` (QuickGELU, sizes, unsupported options)."""
  ours = superclip_model_cfg(model.clone(mode="superclip")) if model.has_text else None
  mismatches = []

  def compare(name, got, want):
    if isinstance(got, (list, tuple)) and len(set(got)) == 1:
      got = got[0]  # image_size / patch_size as [224, 224]
    if got != want and not (isinstance(got, (int, float)) and isinstance(want, (int, float))
                            and float(got) == float(want)):
      mismatches.append(f"{name}: checkpoint {got!r}, model {want!r}")

  if "multimodal_cfg" in model_cfg:
    mismatches.append("multimodal_cfg: CoCa models are not supported")
  compare("quick_gelu", model_cfg.get("quick_gelu", False), model.quick_gelu)
  vision = model_cfg.get("vision_cfg", {})
  a = arch(model)
  for name, want, default in (("image_size", a.image_size, 224),
                              ("layers", a.vision.layers, 12), ("width", a.vision.width, 768),
                              ("patch_size", a.patch, 16),
                              ("head_width", a.vision.width // a.vision.heads, 64),
                              ("mlp_ratio", a.vision.mlp_ratio, 4.0)):  # OpenCLIP's defaults
    compare(f"vision_cfg.{name}", vision.get(name, default), want)
  for name, default in _OPENCLIP_VISION_DEFAULTS.items():
    compare(f"vision_cfg.{name}", vision.get(name, default), default)
  if ours is not None:
    compare("embed_dim", model_cfg.get("embed_dim"), ours["embed_dim"])
    text = model_cfg.get("text_cfg", {})
    for name, default in (("context_length", 77), ("vocab_size", 49408), ("width", 512),
                          ("heads", 8), ("layers", 12), ("mlp_ratio", 4.0)):
      compare(f"text_cfg.{name}", text.get(name, default),
              ours["text_cfg"].get(name, 4.0 if name == "mlp_ratio" else None))
    for name, default in _OPENCLIP_TEXT_DEFAULTS.items():
      compare(f"text_cfg.{name}", text.get(name, default), default)
  head = model_cfg.get("clstext_cfg")
  if head is not None and model.has_head:
    compare("clstext_cfg.layers", head.get("layers", 0), model.head_blocks)
    compare("clstext_cfg.mlp_ratio", head.get("mlp_ratio", 4), model.head_mlp_ratio)
    compare("clstext_cfg.vocab_size", head.get("vocab_size", 49408), model.vocab_size)
  if mismatches:
    raise CheckpointMismatchError(
        "checkpoint config does not match config.model (" + openclip_model_name(model) + "): "
        + "; ".join(mismatches))


# ---------------------------------------------------------------------------------------------
# transformers' CLIPModel.

def hf_config(model) -> dict:
  """transformers `CLIPConfig` as a dict (config.json of a `CLIPModel` directory)."""
  a = arch(model)
  if a.text is None:
    raise ValueError("mode='superclass' has no text tower; transformers' CLIPModel needs one")
  if a.logit_bias is not None:
    raise ValueError("transformers' CLIPModel has no logit_bias, so its logits would differ "
                     "from this SigLIP-style model's; use --format=openclip")
  act = "quick_gelu" if a.quick_gelu else "gelu"  # transformers' 'gelu' is the exact erf GELU
  text = {"model_type": "clip_text_model", "vocab_size": a.vocab_size,
          "hidden_size": a.text.width, "intermediate_size": int(a.text.width * a.text.mlp_ratio),
          "num_hidden_layers": a.text.layers, "num_attention_heads": a.text.heads,
          "max_position_embeddings": a.context_length, "hidden_act": act,
          "layer_norm_eps": models.LN_EPS, "projection_dim": a.embed_dim,
          # EOT is the largest id: transformers pools at its first occurrence, as we pool at
          # the first argmax; its tokenizer pads with EOT, which the causal mask makes harmless.
          "bos_token_id": a.vocab_size - 2, "eos_token_id": a.vocab_size - 1,
          "pad_token_id": a.vocab_size - 1}
  vision = {"model_type": "clip_vision_model", "hidden_size": a.vision.width,
            "intermediate_size": int(a.vision.width * a.vision.mlp_ratio),
            "num_hidden_layers": a.vision.layers, "num_attention_heads": a.vision.heads,
            "image_size": a.image_size, "patch_size": a.patch, "num_channels": 3,
            "hidden_act": act, "layer_norm_eps": models.LN_EPS, "projection_dim": a.embed_dim}
  return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": a.embed_dim,
          "logit_scale_init_value": float(np.log(1 / 0.07)), "text_config": text,
          "vision_config": vision, "dtype": "float32"}


def check_hf_config(config: dict, model) -> None:
  """As `check_openclip_cfg`, for a transformers CLIPModel config.json."""
  if config.get("model_type") != "clip":
    raise CheckpointMismatchError(
        f"config.json model_type={config.get('model_type')!r}: only transformers' CLIPModel "
        f"('clip') is supported")
  # Vision only for mode='superclass' (its checkpoint's text tower is dropped).
  ours = hf_config(model.clone(mode="clip", logit_bias=None))
  towers = ("vision_config", "text_config") if model.has_text else ("vision_config",)
  mismatches = []
  for tower in towers:
    got = config.get(tower, {})
    for name, want in ours[tower].items():
      if name in ("model_type", "bos_token_id", "pad_token_id", "eos_token_id"):
        continue
      if name in got and got[name] != want:
        mismatches.append(f"{tower}.{name}: checkpoint {got[name]!r}, model {want!r}")
  if mismatches:
    raise CheckpointMismatchError("config.json does not match config.model: "
                                  + "; ".join(mismatches))
