"""The three PyTorch layouts as renaming rules: one `Rule` per PyTorch tensor.

  'openclip'   OpenCLIP's `CLIP`: flat text tower (`token_embedding.weight`, `transformer.…`,
               `text_projection`), vision under `visual.`; no head.
  'superclip'  the official SuperCLIP code (an OpenCLIP fork; also OpenCLIP's `CustomTextCLIP`):
               text tower under `text.`, the head under `text_decoder.` (`mlps.{i}.{c_norm,c_fc,
               c_proj}`, `ln_mlp`, `text_projection`) and the float64 IDF buffers `cap_fq`
               [1, vocab] and `num_samples` [1, 1].
  'hf'         transformers' `CLIPModel` (`vision_model.…`, `text_model.…`, separate q/k/v).
               Our head travels beside it with the 'superclip' head names.

Orientation: torch `nn.Linear` weights are [out, in] (our Dense kernels [in, out]); conv weights
OIHW (ours HWIO); `proj`/`text_projection` matrices, embeddings, LayerNorms and biases are the
same both sides. Every conversion is a transpose, split or concatenation (`to_torch` /
`from_torch`), so import(export(p)) is bitwise p.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from superclip_jax.torch_configs import Arch, arch

LAYOUTS = ("openclip", "superclip", "hf")


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


# transformers' separate q/k/v: which third of our fused in_proj each one is.
QKV_PARTS = {"q": 0, "k": 1, "v": 2, "q_bias": 0, "k_bias": 1, "v_bias": 2}


def to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  """Our parameter -> the PyTorch tensor of a `Rule` of this `kind` (for q/k/v: its third)."""
  if kind == "copy":
    return x
  if kind == "linear":
    return x.T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  part = QKV_PARTS[kind]
  if kind.endswith("_bias"):
    d = x.shape[0] // 3
    return x[part * d:(part + 1) * d]
  d = x.shape[0]
  return x[:, part * d:(part + 1) * d].T


def from_torch(x: np.ndarray, kind: str) -> np.ndarray:
  """Inverse of `to_torch`. For q/k/v: that third of our in_proj, which `fuse_qkv` joins."""
  if kind in ("linear", "q", "k", "v"):
    return x.T
  if kind == "conv":
    return x.transpose(2, 3, 1, 0)
  if kind == "copy" or kind in QKV_PARTS:  # the q/k/v biases: already ours
    return x
  raise ValueError(f"unknown rule kind {kind!r}")


def fuse_qkv(parts: dict[str, np.ndarray]) -> np.ndarray:
  """{kind: `from_torch` output} of q, k and v (or their biases) -> our fused in_proj."""
  kinds = ("q_bias", "k_bias", "v_bias") if "q_bias" in parts else ("q", "k", "v")
  return np.concatenate([parts[k] for k in kinds], axis=-1)


def torch_shape(shape: tuple, kind: str) -> tuple:
  """The PyTorch tensor's shape for a parameter of our `shape`."""
  return to_torch(np.empty(shape, np.bool_), kind).shape
