"""Scaled dot-product attention, by implementation (`config.model.attention`).

  'xla'     einsum + float32 softmax + einsum, written out here: the reference numerics, and
            the fastest on CPU.
  'jax'     `jax.nn.dot_product_attention` with its XLA implementation (runs everywhere).
  'cudnn'   `jax.nn.dot_product_attention(implementation='cudnn')`: cuDNN's fused flash
            attention on NVIDIA GPUs (bfloat16/float16 compute, head_dim a multiple of 8,
            at most 128). The causal text mask is the kernel's own causal mode.
  'auto'    'cudnn' on a GPU where it applies, else 'xla' (the default).
TPU: no Pallas splash-attention path yet ('auto' is 'xla' there); it cannot be tested on the
machines this project is developed on.

q, k, v: [batch, length, heads, head_dim]; q is already scaled by head_dim ** -0.5 (as torch's
MultiheadAttention does before its product), so every implementation is called with scale 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "jax", "cudnn")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check(implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention={implementation!r}: use one of "
                     f"{list(IMPLEMENTATIONS)}")


def cudnn_applies(dtype, head_dim: int, backend: str | None = None) -> bool:
  """Whether cuDNN's fused attention runs this case: a GPU, 16-bit compute, a head size it has."""
  backend = backend or jax.default_backend()
  return (backend == "gpu" and jnp.dtype(dtype) in map(jnp.dtype, _CUDNN_DTYPES)
          and head_dim % 8 == 0 and head_dim <= 128)


def resolve(implementation: str, dtype, head_dim: int, backend: str | None = None) -> str:
  """'auto' -> the implementation used on this backend; others are checked and returned."""
  check(implementation)
  if implementation == "auto":
    return "cudnn" if cudnn_applies(dtype, head_dim, backend) else "xla"
  if implementation == "cudnn" and not cudnn_applies(dtype, head_dim, backend):
    raise ValueError(
        f"config.model.attention='cudnn' needs an NVIDIA GPU, bfloat16/float16 compute and a "
        f"head size that is a multiple of 8 up to 128; this is {backend or jax.default_backend()}"
        f", {jnp.dtype(dtype).name}, head size {head_dim}. Use 'auto' or 'xla'.")
  return implementation


def dot_product_attention(q, k, v, *, causal: bool, implementation: str = "auto"):
  """softmax(q k^T [+ causal mask]) v -> [batch, length, heads, head_dim], in q's dtype."""
  implementation = resolve(implementation, q.dtype, q.shape[-1])
  if implementation == "xla":
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if causal:
      length = q.shape[1]
      mask = jnp.tril(jnp.ones((length, length), bool))
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  return jax.nn.dot_product_attention(
      q, k, v, scale=1.0, is_causal=causal,
      implementation="cudnn" if implementation == "cudnn" else "xla")
