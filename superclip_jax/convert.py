"""Our parameters <-> PyTorch state dicts: OpenCLIP, the official SuperCLIP code, Hugging Face.

`to_openclip` / `to_superclip` / `to_hf` / `head_state_dict` export, `from_openclip` /
`from_superclip` / `from_hf` are their inverses, and `load_torch_checkpoint` starts training
from any of them (`config.init_from`). The layouts are `torch_layouts.py`'s renaming rules, the
configs `torch_configs.py`, reading files `torch_io.py`; writing files is `export.py`. All but
the two `load_torch_*` functions are pure functions on numpy arrays.
"""
from __future__ import annotations

import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from superclip_jax import fs
from superclip_jax import scan_layout
from superclip_jax import torch_configs
from superclip_jax import torch_io
from superclip_jax import torch_layouts
from superclip_jax.torch_configs import CheckpointMismatchError
from superclip_jax.torch_layouts import Rule, rules_for


# ---------------------------------------------------------------------------------------------
# Export.

def param_shapes(model) -> dict[tuple, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of `model`'s params, without allocating them."""
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  tokens = jnp.zeros((1, model.context_length), jnp.int32) if model.has_text else None
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
    params, model = scan_layout.unstack_layers(params), model.clone(scan_layers=False)
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
    out[r.key] = np.asarray(torch_layouts.to_torch(x, r.kind), order="C")
  return out


def to_openclip(params, model) -> dict[str, np.ndarray]:
  """OpenCLIP `CLIP` state dict (flat text tower, float32). The class head is not exported."""
  torch_configs.openclip_model_cfg(model)  # validates that OpenCLIP can express the model
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


def idf_counts_from_superclip(state_dict, batch_size: int, where="checkpoint") -> dict:
  """The exact counts an official checkpoint's `cap_fq`/`num_samples` imply at global batch
  `batch_size`: {'doc_freq': int64 [vocab], 'num_docs': int}. The official code adds the
  batch-mean multi-hot (a multiple of 1/B) every step, so cap_fq × B is a whole number up to
  float64 rounding; where it is not, B is not the batch the checkpoint was trained with."""
  if not batch_size or batch_size <= 0:
    raise ValueError(f"{where}: reading cap_fq/num_samples needs the global batch size they "
                     f"were counted at, got {batch_size!r}")
  idf = idf_from_superclip(state_dict, batch_size)
  out = {}
  for name, x in (("doc_freq", np.asarray(idf["doc_freq"])), ("num_docs", idf["num_docs"])):
    x = np.asarray(x, np.float64)
    whole = np.rint(x)
    # float64 running sums of k/B: the rounding grows with the value (~1e-16 per step).
    bad = (np.abs(x - whole) > 1e-3 + 1e-8 * np.abs(x)) | (x < 0) | ~np.isfinite(x)
    if bad.any():
      i = int(np.flatnonzero(bad.reshape(-1))[0])
      key = "cap_fq" if name == "doc_freq" else "num_samples"
      at = f"[0, {i}] (token {i})" if name == "doc_freq" else "[0, 0]"
      raise CheckpointMismatchError(
          f"{where}: {key}{at} × {batch_size} = {x.reshape(-1)[i]!r} is not a whole number of "
          f"captions: the checkpoint was counted at another global batch size than "
          f"{batch_size}; set config.init_from_batch_size to the batch it was trained with")
    out[name] = whole.astype(np.int64)
  if out["doc_freq"].shape != (np.asarray(state_dict["cap_fq"]).size,):
    raise CheckpointMismatchError(f"{where}: cap_fq has shape {np.shape(state_dict['cap_fq'])}")
  return {"doc_freq": out["doc_freq"], "num_docs": int(out["num_docs"])}


def to_superclip(params, model, idf_counts: Optional[dict] = None,
                 batch_size: Optional[int] = None) -> dict[str, np.ndarray]:
  """The official SuperCLIP state dict: `text.*` tower, `text_decoder.*` head, IDF buffers.

  idf_counts: {'doc_freq': [vocab], 'num_docs': scalar} or None; batch_size: the global batch
  (`config.input.batch_size`), which converts counts to the official per-step averages.
  """
  if not (model.has_text and model.has_head):
    raise ValueError(f"the superclip format holds a text tower and the class head; mode="
                     f"{model.mode!r} lacks one (use --format=openclip for CLIP models)")
  out = _export(params, model, rules_for(model, "superclip"), "superclip")
  out.update(superclip_idf_buffers(idf_counts, model.vocab_size, batch_size))
  return out


def to_hf(params, model) -> tuple[dict[str, np.ndarray], dict]:
  """transformers `CLIPModel` (state dict, config dict). The head is `head_state_dict`'s job."""
  config = torch_configs.hf_config(model)
  rules = rules_for(model.clone(mode="clip"), "hf")
  return _export(params, model, rules, "hf"), config


def head_state_dict(params, model) -> dict[str, np.ndarray]:
  """Only the class head, under the official names (`text_decoder.*`): the hf side file."""
  if not model.has_head:
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
  if not model.has_head and key.startswith("text_decoder."):
    return True
  if model.logit_bias is None and key == "logit_bias":
    return True
  if not model.has_text:
    if layout == "hf":
      return key.startswith(("text_model.", "text_projection.")) or key == "logit_scale"
    if layout == "superclip":
      return key.startswith("text.") or key in ("logit_scale", "logit_bias")
    return key.startswith(_OPENCLIP_TEXT_KEYS)
  return False


# The flat text tower and logit parameters of OpenCLIP's CLIP.
_OPENCLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                       "text_projection", "logit_scale", "logit_bias")


# Where each layout keeps what tells a model's sizes apart (see `checkpoint_sizes`).
_SIZE_KEYS = {
    "openclip": ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                 "visual.transformer.resblocks.", "token_embedding.weight",
                 "transformer.resblocks."),
    "superclip": ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                  "visual.transformer.resblocks.", "text.token_embedding.weight",
                  "text.transformer.resblocks."),
    "hf": ("vision_model.embeddings.patch_embedding.weight",
           "vision_model.embeddings.position_embedding.weight", "visual_projection.weight",
           "vision_model.encoder.layers.", "text_model.embeddings.token_embedding.weight",
           "text_model.encoder.layers."),
}


def _layers(state_dict, prefix: str) -> int:
  """How many blocks `prefix<N>.` numbers (the largest N + 1; 0 when none)."""
  ids = [k[len(prefix):].split(".", 1)[0] for k in state_dict if k.startswith(prefix)]
  return 1 + max((int(i) for i in ids if i.isdigit()), default=-1)


def checkpoint_sizes(state_dict, layout: str) -> dict:
  """The sizes a state dict of `layout` holds: image tower (layers, width, patch, image size),
  text tower (layers, width; absent without one) and the embedding dim (0 when unknown)."""
  conv, pos, proj, vblocks, tok, tblocks = _SIZE_KEYS[layout]
  sizes = {}
  if conv in state_dict:
    width, _, patch, _ = np.shape(state_dict[conv])
    grid = int(round((np.shape(state_dict[pos])[0] - 1) ** 0.5)) if pos in state_dict else 0
    sizes.update(vision_layers=_layers(state_dict, vblocks), vision_width=int(width),
                 patch=int(patch), image_size=grid * int(patch))
  if tok in state_dict:
    sizes.update(text_layers=_layers(state_dict, tblocks),
                 text_width=int(np.shape(state_dict[tok])[1]))
  if proj in state_dict:  # OpenCLIP's visual.proj is [width, embed], transformers' [embed, width]
    sizes["embed_dim"] = int(np.shape(state_dict[proj])[0 if layout == "hf" else 1])
  return sizes


def _model_sizes(model) -> dict:
  a = torch_configs.arch(model)
  sizes = dict(vision_layers=a.vision.layers, vision_width=a.vision.width, patch=a.patch,
               image_size=a.image_size, embed_dim=a.embed_dim)
  if a.text is not None:
    sizes.update(text_layers=a.text.layers, text_width=a.text.width)
  return sizes


def _check_sizes(state_dict, model, layout: str) -> None:
  """A checkpoint of another size is named as one: which sizes differ, and what to set."""
  found, want = checkpoint_sizes(state_dict, layout), _model_sizes(model)
  differ = [f"{k} {found[k]} (model {want[k]})" for k in want
            if found.get(k) not in (None, want[k])]
  if differ:
    raise CheckpointMismatchError(
        f"size mismatch: the checkpoint's {', '.join(differ)}; model.variant={model.variant!r}, "
        f"image_size={model.image_size} does not hold it: set config.model.variant (and "
        "image_size, text_size) to the checkpoint's model")


def from_layout(state_dict, model, layout: str) -> dict:
  """A PyTorch state dict of `layout` -> our params (nested dict of numpy arrays).

  Tower parameters (and logit_scale) are required. The class head and logit_bias are optional:
  absent, they are absent from the result too (the caller keeps freshly initialised ones).
  Unknown keys, missing tower keys and shape mismatches raise CheckpointMismatchError naming the
  PyTorch key and our parameter. For a scan_layers model the result is stacked
  (`scan_layout.stack_layers`).
  """
  if model.scan_layers:
    return scan_layout.stack_layers(from_layout(state_dict, model.clone(scan_layers=False), layout))
  _check_sizes(state_dict, model, layout)
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
    x = torch_io.as_numpy(state_dict[r.key])
    torch_shape = torch_layouts.torch_shape(want, r.kind)
    if x.shape != torch_shape:
      if x.size == 1 and int(np.prod(torch_shape)) == 1:
        x = x.reshape(torch_shape)  # logit_scale saved as [1] (OpenCLIP's nonscalar option)
      else:
        raise CheckpointMismatchError(
            f"shape mismatch: checkpoint {r.key} is {tuple(x.shape)}, model {model.variant!r} "
            f"needs {torch_shape} (our {'/'.join(r.path)} {tuple(want)})")
    x = torch_layouts.from_torch(x, r.kind)
    if r.kind in torch_layouts.QKV_PARTS:
      parts.setdefault(r.path, {})[r.kind] = x
    else:
      flat[r.path] = x
  for path, qkv in parts.items():  # transformers' separate q/k/v -> our fused in_proj
    flat[path] = torch_layouts.fuse_qkv(qkv)
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


def load_torch_checkpoint(path, model, init_params, report=logging.info) -> dict:
  """Initialises training from a PyTorch CLIP/SuperCLIP checkpoint (`config.init_from`).

  path: a state-dict file (.safetensors, or .bin/.pt/.pth read with weights_only=True), or a
    directory: OpenCLIP (open_clip_config.json + weights), our superclip export, or a
    transformers CLIPModel. The layout is told from the keys.
  init_params: freshly initialised params; the result has its tree, shapes and dtypes. Parts
    the checkpoint lacks (a CLIP checkpoint has no class head; logit_bias) keep their init.
  report: called with one line naming the layout found and the parts kept fresh.
  Raises CheckpointMismatchError naming the parameter on any mismatch.
  """
  return _params_from(_read_for(path, model), path, model, init_params, report)


def load_torch_init(path, model, init_params, batch_size: int, report=logging.info
                    ) -> tuple[dict, Optional[dict]]:
  """(params, idf): `load_torch_checkpoint`'s params, read once with the IDF counts an official
  SuperCLIP checkpoint carries (`idf_counts_from_superclip` at global batch `batch_size`), or
  None when it has none (a CLIP checkpoint, zero steps, or a model without the head)."""
  state_dict = _read_for(path, model)
  params = _params_from(state_dict, path, model, init_params, report)
  if "cap_fq" not in state_dict or not model.has_head:
    return params, None
  idf = idf_counts_from_superclip(state_dict, batch_size, where=str(path))
  if idf["num_docs"] == 0:
    return params, None
  vocab = model.vocab_size
  if idf["doc_freq"].shape != (vocab,):
    raise CheckpointMismatchError(f"{path}: cap_fq covers {idf['doc_freq'].size} tokens, "
                                  f"model.vocab_size is {vocab}")
  return params, idf


def _read_for(path, model) -> dict:
  """The state dict of a file or directory; a directory's config is checked against `model`."""
  if fs.isdir(path):
    state_dict, config, kind = torch_io.read_checkpoint_dir(path)
    if kind == "openclip" and config:
      torch_configs.check_openclip_cfg(config, model)
    elif kind == "hf" and config:
      torch_configs.check_hf_config(config, model)
    return state_dict
  return torch_io.read_state_dict(path)


def _params_from(state_dict, path, model, init_params, report) -> dict:
  layout = detect_layout(state_dict)
  loaded = traverse_util.flatten_dict(from_layout(state_dict, model, layout))
  flat = traverse_util.flatten_dict(_unfreeze(init_params))
  for p in sorted(set(loaded) - set(flat), key=str):
    raise CheckpointMismatchError(f"init_params lack {'/'.join(p)}, which the checkpoint "
                                  f"has: init_params are not from this model")
  kept = sorted({p[0] for p in set(flat) - set(loaded)})
  report(f"init_from {path}: {layout} layout"
         + (f"; kept freshly initialised: {', '.join(kept)}" if kept else ""))
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
  state_dict = (torch_io.read_checkpoint_dir(path)[0] if fs.isdir(path)
                else torch_io.read_state_dict(path))
  if "cap_fq" not in state_dict:
    return None
  idf = idf_from_superclip(state_dict, batch_size)
  return idf if idf["num_docs"] > 0 else None
