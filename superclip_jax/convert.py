"""Our parameters <-> PyTorch state dicts: OpenCLIP, the official SuperCLIP code, Hugging Face.

Three PyTorch layouts hold the same numbers:
  'openclip'   OpenCLIP's `CLIP`: flat text tower (`token_embedding.weight`, `transformer.…`,
               `text_projection`), vision under `visual.`; no head.
  'superclip'  the official SuperCLIP code (an OpenCLIP fork; also OpenCLIP's `CustomTextCLIP`):
               text tower under `text.`, the head under `text_decoder.` (`mlps.{i}.{c_norm,c_fc,
               c_proj}`, `ln_mlp`, `text_projection`) and the float64 IDF buffers `cap_fq`
               [1, vocab] and `num_samples` [1, 1].
  'hf'         transformers' `CLIPModel` (`vision_model.…`, `text_model.…`, separate q/k/v).
               Our head travels beside it with the 'superclip' head names.

Everything here but `read_state_dict` / `load_torch_checkpoint` is a pure function on numpy
arrays; writing files is `export.py`. torch is imported only to read `.bin`/`.pt` files.

Orientation: torch `nn.Linear` weights are [out, in] (our Dense kernels [in, out]); conv weights
OIHW (ours HWIO); `proj`/`text_projection` matrices, embeddings, LayerNorms and biases are the
same both sides. Every conversion is a transpose, split or concatenation, so import(export(p))
is bitwise p.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from superclip_jax import models

LAYOUTS = ("openclip", "superclip", "hf")
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
  size, patch = models.parse_variant(model.variant)
  has_text = model.mode != "superclass"
  return Arch(
      size=size, patch=patch, image_size=model.image_size, vision=models.VIT_SIZES[size],
      text=models.TEXT_SIZES[model.text_size or size] if has_text else None,
      embed_dim=model.embed_dim or models.EMBED_DIMS[size], vocab_size=model.vocab_size,
      context_length=model.context_length, has_head=model.mode != "clip",
      head_blocks=model.head_blocks, head_mlp_ratio=model.head_mlp_ratio,
      quick_gelu=model.quick_gelu, logit_bias=model.logit_bias if has_text else None)


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


# ---------------------------------------------------------------------------------------------
# Renaming rules: one per PyTorch tensor.

class Rule(NamedTuple):
  key: str  # PyTorch state-dict key
  path: tuple  # our params path
  kind: str  # 'copy' | 'linear' (transpose) | 'conv' (HWIO <-> OIHW) | 'q' 'k' 'v' (+ _bias)
  group: str = "tower"  # 'tower' (required) | 'head' | 'logit_bias' (optional on import)


def _ln(key, path, group="tower"):
  return [Rule(key + ".weight", path + ("scale",), "copy", group),
          Rule(key + ".bias", path + ("bias",), "copy", group)]


def _dense(key, path, group="tower"):
  return [Rule(key + ".weight", path + ("kernel",), "linear", group),
          Rule(key + ".bias", path + ("bias",), "copy", group)]


def _openclip_blocks(prefix, path, layers):
  rules = []
  for i in range(layers):
    k, p = f"{prefix}transformer.resblocks.{i}.", path + ("transformer", f"resblocks_{i}")
    rules += _ln(k + "ln_1", p + ("ln_1",))
    rules += [Rule(k + "attn.in_proj_weight", p + ("attn", "in_proj", "kernel"), "linear"),
              Rule(k + "attn.in_proj_bias", p + ("attn", "in_proj", "bias"), "copy")]
    rules += _dense(k + "attn.out_proj", p + ("attn", "out_proj"))
    rules += _ln(k + "ln_2", p + ("ln_2",))
    rules += _dense(k + "mlp.c_fc", p + ("mlp", "c_fc"))
    rules += _dense(k + "mlp.c_proj", p + ("mlp", "c_proj"))
  return rules


def _head_rules(a: Arch):
  rules = []
  for i in range(a.head_blocks):  # the SuperClass/SuperCLIP MixClsHead's residual MLPs
    k, p = f"text_decoder.mlps.{i}.", ("class_head",)
    rules += _ln(k + "c_norm", p + (f"blocks_{i}_ln",), "head")
    rules += _dense(k + "c_fc", p + (f"blocks_{i}", "c_fc"), "head")
    rules += _dense(k + "c_proj", p + (f"blocks_{i}", "c_proj"), "head")
  rules += _ln("text_decoder.ln_mlp", ("class_head", "ln"), "head")
  rules += _dense("text_decoder.text_projection", ("class_head", "dense"), "head")
  return rules


def _openclip_rules(a: Arch, text_prefix: str):
  v = ("visual",)
  rules = [Rule("visual.conv1.weight", v + ("conv1", "kernel"), "conv"),
           Rule("visual.class_embedding", v + ("class_embedding",), "copy"),
           Rule("visual.positional_embedding", v + ("positional_embedding",), "copy")]
  rules += _ln("visual.ln_pre", v + ("ln_pre",))
  rules += _openclip_blocks("visual.", v, a.vision.layers)
  rules += _ln("visual.ln_post", v + ("ln_post",))
  rules.append(Rule("visual.proj", v + ("proj",), "copy"))
  if a.text is not None:
    t, k = ("text",), text_prefix
    rules += [Rule(k + "token_embedding.weight", t + ("token_embedding", "embedding"), "copy"),
              Rule(k + "positional_embedding", t + ("positional_embedding",), "copy")]
    rules += _openclip_blocks(k, t, a.text.layers)
    rules += _ln(k + "ln_final", t + ("ln_final",))
    rules.append(Rule(k + "text_projection", t + ("text_projection",), "copy"))
    rules.append(Rule("logit_scale", ("logit_scale",), "copy"))
    if a.logit_bias is not None:
      rules.append(Rule("logit_bias", ("logit_bias",), "copy", "logit_bias"))
  return rules


def _hf_blocks(prefix, path, layers):
  rules = []
  for i in range(layers):
    k, p = f"{prefix}encoder.layers.{i}.", path + ("transformer", f"resblocks_{i}")
    rules += _ln(k + "layer_norm1", p + ("ln_1",))
    for part in "qkv":
      rules += [Rule(f"{k}self_attn.{part}_proj.weight", p + ("attn", "in_proj", "kernel"), part),
                Rule(f"{k}self_attn.{part}_proj.bias", p + ("attn", "in_proj", "bias"),
                     part + "_bias")]
    rules += _dense(k + "self_attn.out_proj", p + ("attn", "out_proj"))
    rules += _ln(k + "layer_norm2", p + ("ln_2",))
    rules += _dense(k + "mlp.fc1", p + ("mlp", "c_fc"))
    rules += _dense(k + "mlp.fc2", p + ("mlp", "c_proj"))
  return rules


def _hf_rules(a: Arch):
  v, e = ("visual",), "vision_model.embeddings."
  rules = [Rule(e + "class_embedding", v + ("class_embedding",), "copy"),
           Rule(e + "patch_embedding.weight", v + ("conv1", "kernel"), "conv"),
           Rule(e + "position_embedding.weight", v + ("positional_embedding",), "copy")]
  rules += _ln("vision_model.pre_layrnorm", v + ("ln_pre",))  # sic: transformers' spelling
  rules += _hf_blocks("vision_model.", v, a.vision.layers)
  rules += _ln("vision_model.post_layernorm", v + ("ln_post",))
  rules.append(Rule("visual_projection.weight", v + ("proj",), "linear"))
  if a.text is not None:
    t, e = ("text",), "text_model.embeddings."
    rules += [Rule(e + "token_embedding.weight", t + ("token_embedding", "embedding"), "copy"),
              Rule(e + "position_embedding.weight", t + ("positional_embedding",), "copy")]
    rules += _hf_blocks("text_model.", t, a.text.layers)
    rules += _ln("text_model.final_layer_norm", t + ("ln_final",))
    rules.append(Rule("text_projection.weight", t + ("text_projection",), "linear"))
    rules.append(Rule("logit_scale", ("logit_scale",), "copy"))
  return rules


def rules_for(model, layout: str) -> list[Rule]:
  """Every tensor of `layout` that `model` has, in state-dict order (head included)."""
  a = arch(model)
  if layout == "openclip":
    rules = _openclip_rules(a, "")
  elif layout == "superclip":
    rules = _openclip_rules(a, "text.")
  elif layout == "hf":
    rules = _hf_rules(a)
  else:
    raise ValueError(f"Unknown layout {layout!r}; expected one of {LAYOUTS}")
  return rules + (_head_rules(a) if a.has_head else [])


_PARTS = {"q": 0, "k": 1, "v": 2, "q_bias": 0, "k_bias": 1, "v_bias": 2}


def _to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "copy":
    return x
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  part = _PARTS[kind]
  if kind.endswith("_bias"):
    d = x.shape[0] // 3
    return x[part * d:(part + 1) * d]
  d = x.shape[0]
  return x[:, part * d:(part + 1) * d].T


def _torch_shape(shape: tuple, kind: str) -> tuple:
  """The PyTorch tensor's shape for a parameter of our `shape`."""
  return _to_torch(np.empty(shape, np.bool_), kind).shape


# ---------------------------------------------------------------------------------------------
# Export.

def param_shapes(model) -> dict[tuple, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of `model`'s params, without allocating them."""
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = (None if model.mode == "superclass"
            else jnp.zeros((1, model.context_length), jnp.int32))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)["params"]
  return traverse_util.flatten_dict(_unfreeze(shapes))


def _unfreeze(tree):
  if hasattr(tree, "unfreeze"):
    return tree.unfreeze()
  if isinstance(tree, dict):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def _export(params, model, rules: list[Rule], fmt: str) -> dict[str, np.ndarray]:
  if model.scan_layers:  # the rules name per-layer blocks: export the unstacked layout
    params, model = models.unstack_layers(params), model.clone(scan_layers=False)
  flat = traverse_util.flatten_dict(_unfreeze(params))
  expected = param_shapes(model)
  # Params this format has no place for are an error, except those the format drops by design.
  covered = {r.path for r in rules}
  for path in sorted(set(flat) - covered, key=str):
    if path[0] == "class_head":
      logging.info("format %r has no class head: %s not exported", fmt, "/".join(path))
    else:
      raise CheckpointMismatchError(
          f"params has {'/'.join(path)}, which model {model.variant!r} (mode={model.mode!r}) "
          f"does not: are these params from a different config.model?")
  out = {}
  for r in rules:
    if r.path not in flat:
      raise CheckpointMismatchError(
          f"params lack {'/'.join(r.path)} (needed for {r.key}): are these params from a "
          f"different config.model than {model.variant!r} mode={model.mode!r}?")
    x = np.asarray(flat[r.path])
    if x.shape != expected[r.path].shape:
      raise CheckpointMismatchError(
          f"params {'/'.join(r.path)} has shape {x.shape}, but model {model.variant!r} at "
          f"image_size={model.image_size} expects {expected[r.path].shape}")
    if x.dtype != np.float32 and np.issubdtype(x.dtype, np.floating):
      x = x.astype(np.float32)  # bf16 copies of params still export as PyTorch float32
    out[r.key] = np.asarray(_to_torch(x, r.kind), order="C")
  return out


def to_openclip(params, model) -> dict[str, np.ndarray]:
  """OpenCLIP `CLIP` state dict (flat text tower, float32). The class head is not exported."""
  openclip_model_cfg(model)  # validates that OpenCLIP can express the model
  return _export(params, model, rules_for(model.clone(mode="clip"), "openclip"),
                 "openclip")


def superclip_idf_buffers(idf_counts: Optional[dict], vocab_size: int,
                          batch_size: Optional[int]) -> dict[str, np.ndarray]:
  """Our IDF counts -> the official running statistics `cap_fq` [1, vocab], `num_samples` [1, 1].

  The official code adds the batch-mean multi-hot to `cap_fq` and 1 to `num_samples` every step
  and weighs log((num_samples + 1/B) / (cap_fq + 1/B)); with B the global batch that equals our
  log((num_docs + 1) / (doc_freq + 1)) when cap_fq = doc_freq / B and num_samples = num_docs / B.
  No counts (a run without IDF) -> zeros, the official initial state.
  """
  if idf_counts is None:
    return {"cap_fq": np.zeros((1, vocab_size), np.float64),
            "num_samples": np.zeros((1, 1), np.float64)}
  if not batch_size or batch_size <= 0:
    raise ValueError("superclip export with IDF counts needs the global batch size "
                     f"(config.input.batch_size), got {batch_size!r}")
  doc_freq = np.asarray(idf_counts["doc_freq"], np.float64)
  if doc_freq.shape != (vocab_size,):
    raise CheckpointMismatchError(
        f"idf doc_freq has shape {doc_freq.shape}, expected ({vocab_size},) (model.vocab_size)")
  num_docs = float(np.asarray(idf_counts["num_docs"], np.float64))
  return {"cap_fq": (doc_freq / batch_size)[None, :],
          "num_samples": np.full((1, 1), num_docs / batch_size, np.float64)}


def idf_from_superclip(state_dict, batch_size: int) -> dict:
  """Inverse of `superclip_idf_buffers`: {'doc_freq': float64 [vocab], 'num_docs': float}."""
  for key in ("cap_fq", "num_samples"):
    if key not in state_dict:
      raise CheckpointMismatchError(f"checkpoint has no {key!r} buffer (not a SuperCLIP one?)")
  cap_fq = np.asarray(state_dict["cap_fq"], np.float64)
  num_samples = np.asarray(state_dict["num_samples"], np.float64)
  return {"doc_freq": cap_fq.reshape(-1) * batch_size,
          "num_docs": float(num_samples.reshape(()) * batch_size)}


def to_superclip(params, model, idf_counts: Optional[dict] = None,
                 batch_size: Optional[int] = None) -> dict[str, np.ndarray]:
  """The official SuperCLIP state dict: `text.*` tower, `text_decoder.*` head, IDF buffers.

  idf_counts: {'doc_freq': [vocab], 'num_docs': scalar} or None; batch_size: the global batch
  (`config.input.batch_size`), which converts counts to the official per-step averages.
  """
  if model.mode != "superclip":
    raise ValueError(f"the superclip format holds a text tower and the class head; mode="
                     f"{model.mode!r} lacks one (use --format=openclip for CLIP models)")
  out = _export(params, model, rules_for(model, "superclip"), "superclip")
  out.update(superclip_idf_buffers(idf_counts, model.vocab_size, batch_size))
  return out


def to_hf(params, model) -> tuple[dict[str, np.ndarray], dict]:
  """transformers `CLIPModel` (state dict, config dict). The head is `head_state_dict`'s job."""
  config = hf_config(model)
  rules = rules_for(model.clone(mode="clip"), "hf")
  return _export(params, model, rules, "hf"), config


def head_state_dict(params, model) -> dict[str, np.ndarray]:
  """Only the class head, under the official names (`text_decoder.*`): the hf side file."""
  if model.mode == "clip":
    raise ValueError("mode='clip' has no class head")
  rules = [r for r in rules_for(model, "superclip") if r.group == "head"]
  flat = traverse_util.flatten_dict(_unfreeze(params))
  head = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[0] == "class_head"})
  return _export(head, model, rules, "head")


# ---------------------------------------------------------------------------------------------
# Import.

# Tensors that carry no parameters: buffers of other versions, OpenAI's metadata.
_IGNORED = ("position_ids", "attn_mask", "input_resolution", "context_length", "vocab_size")


def detect_layout(state_dict) -> str:
  """'openclip' | 'superclip' | 'hf' from the keys; raises on anything else, naming a key."""
  keys = list(state_dict)
  if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
    return "hf"
  if any(k.startswith(("text.", "text_decoder.")) for k in keys) or "cap_fq" in state_dict:
    return "superclip"
  if "visual.conv1.weight" in state_dict:
    return "openclip"
  odd = next((k for k in keys if k.startswith(("visual.trunk.", "visual.layer1."))), None)
  if odd:
    raise CheckpointMismatchError(
        f"unsupported architecture: {odd} is a timm/ResNet vision tower; only OpenCLIP's "
        f"VisionTransformer is supported")
  raise CheckpointMismatchError(
      f"unrecognised checkpoint: none of the OpenCLIP, SuperCLIP or transformers CLIP keys "
      f"(first keys: {keys[:5]})")


def _unused_by_model(key: str, model, layout: str) -> bool:
  """Keys of parts the checkpoint has and the model lacks (dropped on import, with a log)."""
  if model.mode == "clip" and key.startswith("text_decoder."):
    return True
  if model.logit_bias is None and key == "logit_bias":
    return True
  if model.mode == "superclass":
    if layout == "hf":
      return key.startswith(("text_model.", "text_projection.")) or key == "logit_scale"
    if layout == "superclip":
      return key.startswith("text.") or key in ("logit_scale", "logit_bias")
    return key.startswith(_OPENCLIP_TEXT_KEYS)
  return False


# The flat text tower and logit parameters of OpenCLIP's CLIP.
_OPENCLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                       "text_projection", "logit_scale", "logit_bias")


def from_layout(state_dict, model, layout: str) -> dict:
  """A PyTorch state dict of `layout` -> our params (nested dict of numpy arrays).

  Tower parameters (and logit_scale) are required. The class head and logit_bias are optional:
  absent, they are absent from the result too (the caller keeps freshly initialised ones).
  Unknown keys, missing tower keys and shape mismatches raise CheckpointMismatchError naming the
  PyTorch key and our parameter. For a scan_layers model the result is stacked
  (`models.stack_layers`).
  """
  if model.scan_layers:
    return models.stack_layers(from_layout(state_dict, model.clone(scan_layers=False), layout))
  rules = rules_for(model, layout)
  shapes = param_shapes(model)
  known = {r.key for r in rules}
  extra = ({"cap_fq", "num_samples"} if layout == "superclip" else set())
  unused = []
  for key in state_dict:
    if key in known or key in extra or key.rsplit(".", 1)[-1] in _IGNORED:
      continue
    if _unused_by_model(key, model, layout):
      unused.append(key)
      continue
    raise CheckpointMismatchError(
        f"unsupported architecture: checkpoint tensor {key!r} {tuple(np.shape(state_dict[key]))}"
        f" has no counterpart in model {model.variant!r} (mode={model.mode!r}, head_blocks="
        f"{model.head_blocks}) in the {layout} layout")
  if unused:
    logging.warning("checkpoint tensors not used by mode=%r and dropped: %s%s", model.mode,
                    unused[:4], " ..." if len(unused) > 4 else "")

  present = {g: [r for r in rules if r.group == g and r.key in state_dict]
             for g in ("tower", "head", "logit_bias")}
  for group in ("head", "logit_bias"):
    wanted = [r for r in rules if r.group == group]
    if present[group] and len(present[group]) != len(wanted):
      missing = [r.key for r in wanted if r.key not in state_dict]
      raise CheckpointMismatchError(f"checkpoint has part of the {group} but lacks {missing[:4]}")
  missing = [r for r in rules if r.group == "tower" and r.key not in state_dict]
  if missing:
    raise CheckpointMismatchError(
        f"checkpoint lacks {missing[0].key!r} (our {'/'.join(missing[0].path)})"
        + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        + f": it does not hold a {model.variant!r} model in the {layout} layout")

  flat, parts = {}, {}
  for r in [r for g in present.values() for r in g]:
    want = shapes[r.path].shape
    x = _as_numpy(state_dict[r.key])
    torch_shape = _torch_shape(want, r.kind)
    if x.shape != torch_shape:
      if x.size == 1 and int(np.prod(torch_shape)) == 1:
        x = x.reshape(torch_shape)  # logit_scale saved as [1] (OpenCLIP's nonscalar option)
      else:
        raise CheckpointMismatchError(
            f"shape mismatch: checkpoint {r.key} is {tuple(x.shape)}, model {model.variant!r} "
            f"needs {torch_shape} (our {'/'.join(r.path)} {tuple(want)})")
    if r.kind in _PARTS:
      parts.setdefault(r.path, {})[r.kind] = x
    elif r.kind == "linear":
      flat[r.path] = x.T
    elif r.kind == "conv":
      flat[r.path] = x.transpose(2, 3, 1, 0)
    else:
      flat[r.path] = x
  for path, qkv in parts.items():  # transformers' separate q/k/v -> our fused in_proj
    if "q_bias" in qkv:
      flat[path] = np.concatenate([qkv["q_bias"], qkv["k_bias"], qkv["v_bias"]])
    else:
      flat[path] = np.concatenate([qkv["q"].T, qkv["k"].T, qkv["v"].T], axis=1)
  return traverse_util.unflatten_dict({p: np.asarray(v, order="C") for p, v in flat.items()})


def from_openclip(state_dict, model) -> dict:
  """OpenCLIP `CLIP` state dict -> our params (no head)."""
  return from_layout(state_dict, model, "openclip")


def from_superclip(state_dict, model) -> dict:
  """Official SuperCLIP (or OpenCLIP `CustomTextCLIP`) state dict -> our params, head included
  when present. The IDF buffers are `idf_from_superclip`'s."""
  return from_layout(state_dict, model, "superclip")


def from_hf(state_dict, model) -> dict:
  """transformers `CLIPModel` state dict (optionally merged with the head side file)."""
  return from_layout(state_dict, model, "hf")


def _as_numpy(x) -> np.ndarray:
  if isinstance(x, np.ndarray):
    return x
  if type(x).__module__.startswith("torch"):
    return _torch_to_numpy(x)
  return np.asarray(x)


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits (exact)
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


# ---------------------------------------------------------------------------------------------
# Reading checkpoints (for config.init_from).

def read_state_dict(path) -> dict[str, np.ndarray]:
  """A PyTorch state-dict file -> {key: numpy array}. Never unpickles arbitrary objects:
  `.safetensors` directly, `.bin`/`.pt`/`.pth` with `torch.load(weights_only=True)` (torch is
  imported only then). A `{'state_dict': ...}` wrapper and a `module.` prefix are removed."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if path.suffix == ".safetensors":
    sd = _read_safetensors(path)
  elif path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
    sd = _read_torch_file(path)
  else:
    raise ValueError(f"{path}: expected a .safetensors, .bin, .pt or .pth file, or a model "
                     f"directory")
  return _unwrap(sd, path)


def _read_safetensors(path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(str(path))
  except TypeError:  # bfloat16 tensors: numpy lacks the dtype, so read the raw buffers
    return _read_safetensors_raw(path)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_raw(path) -> dict[str, np.ndarray]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  data = pathlib.Path(path).read_bytes()
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _SAFETENSORS_DTYPES[info["dtype"]]
    start, end = info["data_offsets"]
    out[key] = np.frombuffer(data, dtype, count=(end - start) // np.dtype(dtype).itemsize,
                             offset=8 + n + start).reshape(info["shape"])
  return out


def _read_torch_file(path) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch (pip install torch); safetensors files "
                      f"do not") from e
  try:
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"could not read {path} with torch.load(weights_only=True): {e}. Only plain tensor "
        f"state dicts are read (no pickled objects, no TorchScript archives such as OpenAI's "
        f"original .pt files: load those with open_clip and save model.state_dict()).") from e
  return sd


def _unwrap(sd, path) -> dict[str, np.ndarray]:
  if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
  if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
    sd = {k[len("module."):]: v for k, v in sd.items()}
  out = {}
  for key, value in sd.items():
    if not hasattr(value, "shape"):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    out[key] = _as_numpy(value)
  return out


# Weight files in a model directory, most preferred first (OpenCLIP's and transformers' names).
_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "superclip_model.safetensors", "model.safetensors",
                "open_clip_pytorch_model.bin", "superclip_model.bin", "pytorch_model.bin")
HF_HEAD_FILE = "superclip_head.safetensors"


def read_checkpoint_dir(directory) -> tuple[dict[str, np.ndarray], Optional[dict], str]:
  """A model directory -> (state dict, config dict or None, config kind).

  kind: 'openclip' (open_clip_config.json's model_cfg, or a SuperCLIP-*.json model config),
  'hf' (config.json of a transformers CLIPModel; the head side file is merged in) or ''.
  """
  d = pathlib.Path(directory)
  config, kind = None, ""
  if (d / "open_clip_config.json").is_file():
    config = json.loads((d / "open_clip_config.json").read_text()).get("model_cfg")
    kind = "openclip"
  elif (d / "config.json").is_file():
    config = json.loads((d / "config.json").read_text())
    kind = "hf"
  else:
    cfgs = sorted(p for p in d.glob("*.json")
                  if "embed_dim" in json.loads(p.read_text() or "{}"))
    if cfgs:
      config, kind = json.loads(cfgs[0].read_text()), "openclip"
  weights = next((d / n for n in _DIR_WEIGHTS if (d / n).is_file()), None)
  if weights is None:
    candidates = sorted(p for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth")
                        for p in d.glob(ext) if p.name != HF_HEAD_FILE)
    if len(candidates) != 1:
      raise FileNotFoundError(
          f"{d}: expected one weights file (e.g. {_DIR_WEIGHTS[0]}), found "
          f"{[p.name for p in candidates]}")
    weights = candidates[0]
  sd = read_state_dict(weights)
  if kind == "hf" and (d / HF_HEAD_FILE).is_file():
    sd.update(read_state_dict(d / HF_HEAD_FILE))
  return sd, config, kind


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
  ours = (superclip_model_cfg(model.clone(mode="superclip"))
          if model.mode != "superclass" else None)
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
  if head is not None and model.mode != "clip":
    compare("clstext_cfg.layers", head.get("layers", 0), model.head_blocks)
    compare("clstext_cfg.mlp_ratio", head.get("mlp_ratio", 4), model.head_mlp_ratio)
    compare("clstext_cfg.vocab_size", head.get("vocab_size", 49408), model.vocab_size)
  if mismatches:
    raise CheckpointMismatchError(
        "checkpoint config does not match config.model (" + openclip_model_name(model) + "): "
        + "; ".join(mismatches))


def check_hf_config(config: dict, model) -> None:
  """As `check_openclip_cfg`, for a transformers CLIPModel config.json."""
  if config.get("model_type") != "clip":
    raise CheckpointMismatchError(
        f"config.json model_type={config.get('model_type')!r}: only transformers' CLIPModel "
        f"('clip') is supported")
  # Vision only for mode='superclass' (its checkpoint's text tower is dropped).
  ours = hf_config(model.clone(mode="clip", logit_bias=None))
  towers = ("vision_config",) if model.mode == "superclass" else ("vision_config", "text_config")
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


def load_torch_checkpoint(path, model, init_params) -> dict:
  """Initialises training from a PyTorch CLIP/SuperCLIP checkpoint (`config.init_from`).

  path: a state-dict file (.safetensors, or .bin/.pt/.pth read with weights_only=True), or a
    directory: OpenCLIP (open_clip_config.json + weights), our superclip export, or a
    transformers CLIPModel. The layout is told from the keys.
  init_params: freshly initialised params; the result has its tree, shapes and dtypes. Parts
    the checkpoint lacks (a CLIP checkpoint has no class head; logit_bias) keep their init.
  Raises CheckpointMismatchError naming the parameter on any mismatch.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    state_dict, config, kind = read_checkpoint_dir(path)
    if kind == "openclip" and config:
      check_openclip_cfg(config, model)
    elif kind == "hf" and config:
      check_hf_config(config, model)
  else:
    state_dict = read_state_dict(path)
  layout = detect_layout(state_dict)
  loaded = traverse_util.flatten_dict(from_layout(state_dict, model, layout))
  flat = traverse_util.flatten_dict(_unfreeze(init_params))
  for p in sorted(set(loaded) - set(flat), key=str):
    raise CheckpointMismatchError(f"init_params lack {'/'.join(p)}, which the checkpoint "
                                  f"has: init_params are not from this model")
  kept = sorted({p[0] for p in set(flat) - set(loaded)})
  if kept:
    logging.info("init_from %s (%s layout): kept freshly initialised %s", path, layout,
                 ", ".join(kept))
  out = {}
  for p, init in flat.items():
    if p not in loaded:
      out[p] = init
      continue
    x = loaded[p]
    if tuple(x.shape) != tuple(init.shape):
      raise CheckpointMismatchError(f"{'/'.join(p)}: checkpoint {tuple(x.shape)}, init_params "
                                    f"{tuple(init.shape)}")
    out[p] = np.asarray(x).astype(init.dtype)
  return traverse_util.unflatten_dict(out)


def load_torch_idf(path, batch_size: int) -> Optional[dict]:
  """The IDF counts of an official SuperCLIP checkpoint (file or directory), or None if it has
  none (a CLIP checkpoint, or zero steps)."""
  path = pathlib.Path(path)
  state_dict = read_checkpoint_dir(path)[0] if path.is_dir() else read_state_dict(path)
  if "cap_fq" not in state_dict:
    return None
  idf = idf_from_superclip(state_dict, batch_size)
  return idf if idf["num_docs"] > 0 else None

