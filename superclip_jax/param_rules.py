"""Regex rules over parameter names; first match wins (as in big_vision).

A parameter's name is its path in the params tree joined with '/', e.g.
'visual/transformer/resblocks_0/attn/in_proj/kernel'. Rules are (regex, value) pairs matched
with `re.fullmatch`; they select weight-decay multipliers, frozen groups and shardings.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax


def tree_names(tree) -> Any:
  """A tree of the same structure whose leaves are the '/'-joined key paths."""
  def name(path, _):
    return "/".join(_key_str(k) for k in path)
  return jax.tree_util.tree_map_with_path(name, tree)


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def first_match(rules: Sequence[tuple[str, Any]], name: str, default=None, *, what="rule"):
  for pattern, value in rules:
    if re.fullmatch(pattern, name):
      return value
  if default is not None:
    return default
  raise ValueError(f"No {what} matches parameter {name!r}; add a catch-all ('.*', ...) rule.")


def tree_match(rules: Sequence[tuple[str, Any]], tree, default=None, *, what="rule"):
  """Maps every leaf of `tree` to the value of the first rule matching its name."""
  compiled = [(str(p), v) for p, v in rules]
  for pattern, _ in compiled:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"Bad regex {pattern!r} in {what}s: {e}") from None
  return jax.tree.map(lambda n: first_match(compiled, n, default, what=what), tree_names(tree))


def matches_any(patterns: Sequence[str], tree):
  """Tree of bools: does the leaf's name fully match any of `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda n: any(p.fullmatch(n) for p in compiled), tree_names(tree))
