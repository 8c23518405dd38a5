"""Exports a trained checkpoint for PyTorch: OpenCLIP, the official SuperCLIP code, Hugging Face.

  python -m superclip_jax.export --workdir=DIR [--step=N] --format=openclip --out=OUT
    OUT/open_clip_config.json, open_clip_model.safetensors, open_clip_pytorch_model.bin:
    open_clip.create_model_and_transforms('local-dir:OUT') loads it (no class head).
  --format=superclip
    OUT/superclip_model.safetensors + .bin (the official code's state dict, head and IDF
    statistics included) and OUT/SuperCLIP-<name>.json, its model config.
  --format=hf
    a transformers CLIPModel / CLIPTokenizer directory; the head in superclip_head.safetensors.

Every export ends with OUT/export_manifest.json, its commit point (`export_dir.py`). The
renaming itself is `convert.py`, the configs `torch_configs.py`; this file only writes files.
safetensors files need no torch; the `.bin` copies are written when torch is installed.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
from typing import Optional

from absl import app
from absl import flags
import numpy as np

from superclip_jax import cli
from superclip_jax import convert
from superclip_jax import export_dir
from superclip_jax import fs
from superclip_jax import models
from superclip_jax import tokenizer
from superclip_jax import torch_configs
from superclip_jax import torch_io

FORMATS = ("openclip", "superclip", "hf")


def write_export(params, model: models.SuperCLIP, fmt: str, out_dir, idf: Optional[dict] = None,
                 batch_size: Optional[int] = None, step: Optional[int] = None) -> list[str]:
  """Writes `params` of `model` to `out_dir` in format `fmt`; returns the files written.

  idf: {'doc_freq': [vocab], 'num_docs': float} IDF counts (superclip format; None -> zeros);
  batch_size: the global batch (config.input.batch_size), which scales them to the official
  per-step statistics; step: the checkpoint's, recorded in the manifest. Files of an earlier
  export of the same format are replaced; weights or configs of another one make it an error
  (a loader could pick up the stale file). The files are committed as one by
  `export_dir.write`'s manifest (a killed export is refused by loaders, not loaded as a mix).
  """
  files = export_files(params, model, fmt, idf, batch_size)
  out = os.fspath(out_dir)
  fs.makedirs(out)
  for name in fs.listdir(out):
    stale = (name.endswith((".safetensors", ".bin", ".pt", ".pth"))
             or name in ("open_clip_config.json", "config.json")
             or name.startswith("SuperCLIP-"))
    if stale and name not in files:
      raise FileExistsError(f"{out} already holds {name}, which a {fmt} export does not "
                            f"write: use an empty --out directory")
  return export_dir.write(out, fmt, step, ((name, _encode(name, content))
                                           for name, content in files.items()))


def _encode(name: str, content) -> bytes:
  if isinstance(content, str):
    return content.encode("utf-8")
  if name.endswith(".safetensors"):
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    return save(content, metadata={"format": "pt"})  # transformers checks 'format'
  import torch  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  torch.save({k: torch.from_numpy(v.copy()) for k, v in content.items()}, buffer)
  return buffer.getvalue()


def export_files(params, model, fmt: str, idf=None, batch_size=None) -> dict:
  """{file name: text, or a state dict for .safetensors / .bin} of an export, in memory."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: use one of {FORMATS}")
  if fmt == "openclip":
    config = {"model_cfg": torch_configs.openclip_model_cfg(model),
              "preprocess_cfg": torch_configs.preprocess_cfg(model)}
    return {"open_clip_config.json": _json(config),
            **_weights("open_clip_model", convert.to_openclip(params, model),
                       "open_clip_pytorch_model")}
  if fmt == "superclip":
    name = f"SuperCLIP-{torch_configs.openclip_model_name(model)}.json"
    return {name: _json(torch_configs.superclip_model_cfg(model)),
            **_weights("superclip_model",
                       convert.to_superclip(params, model, idf, batch_size), "superclip_model")}
  state_dict, config = convert.to_hf(params, model)
  files = {"config.json": _json(config), **_weights("model", state_dict),
           **_hf_preprocessing_files(model)}
  if model.has_head:
    files[torch_io.HF_HEAD_FILE] = _contiguous(convert.head_state_dict(params, model))
  return files


def _json(obj) -> str:
  return json.dumps(obj, indent=2) + "\n"


def _contiguous(state_dict):
  return {k: np.asarray(v, order="C") for k, v in state_dict.items()}


def _weights(name: str, state_dict, bin_name: Optional[str] = None) -> dict:
  """name.safetensors, and bin_name.bin (for torch.load(weights_only=True)) if torch is here."""
  files = {f"{name}.safetensors": _contiguous(state_dict)}
  if bin_name:
    try:
      import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
      files[f"{bin_name}.bin"] = files[f"{name}.safetensors"]
    except ImportError:
      logging.warning("torch is not installed: no %s.bin written (the .safetensors has the "
                      "same weights; docs/export.md shows the one command that makes the .bin "
                      "from it where torch is installed)", bin_name)
  return files


def hf_tokenizer_files() -> tuple[dict, list[str]]:
  """(vocab.json dict, merges) of our tokenizer (= OpenCLIP's) for transformers' CLIPTokenizer.

  The vocabulary is OpenCLIP's order: 256 byte symbols, the same with '</w>', one entry per
  merge, then the two specials (transformers' names), so ids are equal on both sides.
  """
  lines = gzip.open(tokenizer.VOCAB_PATH, "rt", encoding="utf-8").read().split("\n")
  merges = lines[1:1 + tokenizer.NUM_MERGES]  # line 0 is a version header
  order, symbol = tokenizer._byte_symbols()  # pylint: disable=protected-access
  pieces = [symbol[b] for b in order]
  pieces += [p + "</w>" for p in pieces] + ["".join(m.split()) for m in merges]
  pieces += ["<|startoftext|>", "<|endoftext|>"]
  if len(pieces) != tokenizer.VOCAB_SIZE:
    raise ValueError(f"{tokenizer.VOCAB_PATH}: built {len(pieces)} tokens, expected "
                     f"{tokenizer.VOCAB_SIZE}")
  return {p: i for i, p in enumerate(pieces)}, merges


def _hf_preprocessing_files(model) -> dict:
  """CLIPImageProcessor and CLIPTokenizer files: OpenCLIP's eval transform and tokenizer."""
  size = model.image_size
  image = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
           "size": {"shortest_edge": size}, "resample": 3,  # bicubic
           "do_center_crop": True, "crop_size": {"height": size, "width": size},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": list(torch_configs.IMAGE_MEAN), "image_std": list(torch_configs.IMAGE_STD),
           "do_convert_rgb": True}
  files = {"preprocessor_config.json": _json(image)}
  if not model.has_text:
    return files
  if model.vocab_size != tokenizer.VOCAB_SIZE:
    logging.warning("vocab_size %d is not our tokenizer's: no tokenizer files written",
                    model.vocab_size)
    return files
  vocab, merges = hf_tokenizer_files()
  specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
  tokenizer_config = {"tokenizer_class": "CLIPTokenizer",
                      "model_max_length": model.context_length, **specials}
  return {**files, "vocab.json": _json(vocab),
          "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
          "special_tokens_map.json": _json(specials),
          "tokenizer_config.json": _json(tokenizer_config)}


def main(argv):
  del argv
  from superclip_jax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: CLI only)
  config, params, idf, step = checkpoint.load_params(flags.FLAGS.workdir, flags.FLAGS.step)
  model = models.model_from_config(config.model)
  written = write_export(params, model, flags.FLAGS.format, flags.FLAGS.out, idf=idf,
                         batch_size=config.input.batch_size, step=step)
  print("\n".join(str(path) for path in written))


def define_flags():
  # Defined only when run as a program: this module is also a library, imported beside
  # main.py, which defines --workdir too.
  flags.DEFINE_string("workdir", None, "Training workdir holding the checkpoints.")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_enum("format", None, FORMATS, "Target layout.")
  flags.DEFINE_string("out", None, "Output directory (created if needed).")
  flags.mark_flags_as_required(["workdir", "format", "out"])


if __name__ == "__main__":
  define_flags()
  app.run(cli.one_line_errors(main))
