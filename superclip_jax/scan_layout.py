"""The scan_layers parameter layout: per-layer blocks stacked on a leading [layers] axis.

With `config.model.scan_layers` each tower's blocks are one `nn.scan` named `resblocks` whose
parameters are the per-layer ones (`resblocks_0 .. resblocks_{n-1}`) stacked along a new
leading axis. `stack_layers` / `unstack_layers` convert between the two layouts exactly, so
export, import, `init_from` and inference work on either.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# The scanned blocks' name; per-layer blocks are f"resblocks_{i}".
STACKED_BLOCKS = "resblocks"
_LAYER_BLOCK = re.compile(r"resblocks_(\d+)")


def is_stacked(name: str) -> bool:
  """Does parameter `name` ('visual/transformer/resblocks/ln_1/scale') carry a leading
  [layers] axis (a scan_layers parameter, or its optimizer moment)?"""
  return STACKED_BLOCKS in name.split("/")


def _stack(leaves):
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
  if all(isinstance(x, (np.ndarray, np.generic, float, int)) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _index(x, i):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
  return x[i]


def stack_layers(tree):
  """Per-layer params -> the scan_layers=True layout, exactly.

  Every mapping holding `resblocks_0 .. resblocks_{n-1}` gets instead one `resblocks` whose
  leaves are the n per-layer leaves stacked along a new leading axis [n, ...]; everything else
  is kept. Works on any tree of nested mappings with the params' names (params, gradients,
  weight-decay masks) whose leaves are numpy/jax arrays, scalars or ShapeDtypeStructs
  (numpy in, numpy out). Inverse of `unstack_layers`.
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {k: stack_layers(v) for k, v in tree.items() if not _LAYER_BLOCK.fullmatch(k)}
  layers = sorted(int(_LAYER_BLOCK.fullmatch(k).group(1)) for k in tree
                  if _LAYER_BLOCK.fullmatch(k))
  if layers:
    if layers != list(range(len(layers))):
      raise ValueError(f"stack_layers: blocks {['resblocks_%d' % i for i in layers]} are not "
                       f"numbered 0..{len(layers) - 1}")
    if STACKED_BLOCKS in tree:
      raise ValueError("stack_layers: the tree has both resblocks_{i} and stacked resblocks")
    blocks = [tree[f"resblocks_{i}"] for i in layers]
    out[STACKED_BLOCKS] = jax.tree.map(lambda *xs: _stack(xs), *blocks)
  return out


def unstack_layers(tree):
  """The scan_layers=True layout -> per-layer params (`resblocks_{i}`), exactly; the inverse
  of `stack_layers`. A tree without stacked blocks is returned as it is (as plain dicts)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: unstack_layers(v) for k, v in tree.items() if k != STACKED_BLOCKS}
  if STACKED_BLOCKS in tree:
    stacked = tree[STACKED_BLOCKS]
    layers = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
    if len(layers) != 1:
      raise ValueError(f"unstack_layers: stacked blocks with different leading sizes {layers}")
    for i in range(layers.pop()):
      out[f"resblocks_{i}"] = jax.tree.map(lambda x, i=i: _index(x, i), stacked)
  return out
