"""Reading PyTorch checkpoints: state-dict files and model directories -> {key: numpy array}.

Never unpickles arbitrary objects: `.safetensors` directly, `.bin`/`.pt`/`.pth` with
`torch.load(weights_only=True)`; torch is imported only for those.
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Optional

import numpy as np

from superclip_jax import export_dir
from superclip_jax import fs


def as_numpy(x) -> np.ndarray:
  """A torch tensor (bfloat16 included, bit-exact), or anything array-like -> numpy."""
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


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A PyTorch state-dict file -> {key: numpy array}. Never unpickles arbitrary objects:
  `.safetensors` directly, `.bin`/`.pt`/`.pth` with `torch.load(weights_only=True)` (torch is
  imported only then). A `{'state_dict': ...}` wrapper and a `module.` prefix are removed."""
  path = os.fspath(path)
  if not fs.exists(path) or fs.isdir(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  suffix = os.path.splitext(fs.basename(path))[1]
  if suffix == ".safetensors":
    sd = _read_safetensors(path)
  elif suffix in (".bin", ".pt", ".pth", ".ckpt"):
    sd = _read_torch_file(path)
  else:
    raise ValueError(f"{path}: expected a .safetensors, .bin, .pt or .pth file, or a model "
                     f"directory")
  return _unwrap(sd, path)


def _read_safetensors(path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load, load_file  # pylint: disable=g-import-not-at-top
  data = fs.read_bytes(path) if fs.is_url(path) else None  # local files: mapped, not read
  try:
    try:
      return load_file(path) if data is None else load(data)
    except TypeError:  # bfloat16 tensors: numpy lacks the dtype, so read the raw buffers
      return _read_safetensors_raw(fs.read_bytes(path) if data is None else data)
  except (SafetensorError, ValueError, KeyError, OSError) as e:
    size = fs.size(path) if fs.exists(path) else 0
    raise ValueError(f"{path} ({size:,} bytes) is not a readable .safetensors file: {e}. It is "
                     "empty, truncated or damaged: copy or download it again") from None


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_raw(data: bytes) -> dict[str, np.ndarray]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
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
    source = io.BytesIO(fs.read_bytes(path)) if fs.is_url(path) else path
    sd = torch.load(source, map_location="cpu", weights_only=True)
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
    out[key] = as_numpy(value)
  return out


# ---------------------------------------------------------------------------------------------
# Model directories.

# Weight files in a model directory, most preferred first (OpenCLIP's and transformers' names).
_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "superclip_model.safetensors", "model.safetensors",
                "open_clip_pytorch_model.bin", "superclip_model.bin", "pytorch_model.bin")
HF_HEAD_FILE = "superclip_head.safetensors"


def read_checkpoint_dir(directory) -> tuple[dict[str, np.ndarray], Optional[dict], str]:
  """A model directory -> (state dict, config dict or None, config kind).

  kind: 'openclip' (open_clip_config.json's model_cfg, or a SuperCLIP-*.json model config),
  'hf' (config.json of a transformers CLIPModel; the head side file is merged in) or ''.
  The files read are first checked against our export manifest, where there is one
  (`export_dir.check`).
  """
  d = os.fspath(directory)
  names = set(fs.listdir(d))
  config_name, kind = None, ""
  if "open_clip_config.json" in names:
    config_name, kind = "open_clip_config.json", "openclip"
  elif "config.json" in names:
    config_name, kind = "config.json", "hf"
  else:
    cfgs = [n for n in sorted(names) if n.endswith(".json")
            and "embed_dim" in json.loads(fs.read_text(fs.join(d, n)) or "{}")]
    if cfgs:
      config_name, kind = cfgs[0], "openclip"
  weights = next((n for n in _DIR_WEIGHTS if n in names), None)
  if weights is None:
    candidates = sorted(n for n in names if n != HF_HEAD_FILE
                        and n.endswith((".safetensors", ".bin", ".pt", ".pth")))
    if len(candidates) != 1:
      raise FileNotFoundError(
          f"{d}: expected one weights file (e.g. {_DIR_WEIGHTS[0]}), found {candidates}")
    weights = candidates[0]
  head = HF_HEAD_FILE if kind == "hf" and HF_HEAD_FILE in names else None
  read = [n for n in (config_name, weights, head) if n]
  if not export_dir.check(d, names, read) and head:
    logging.warning("%s has no %s: nothing shows that %s and %s are from one export (an "
                    "export from before manifests?); re-export to be sure", d,
                    export_dir.MANIFEST, weights, head)
  config = json.loads(fs.read_text(fs.join(d, config_name))) if config_name else None
  if config_name == "open_clip_config.json":
    config = config.get("model_cfg")
  sd = read_state_dict(fs.join(d, weights))
  if head:
    sd.update(read_state_dict(fs.join(d, head)))
  return sd, config, kind
