"""An independent float64 numpy implementation of OpenCLIP's towers and SuperCLIP's losses,
written from the published formulas (FACTS.md), used as the expectation in tests."""
import math

import numpy as np


def layer_norm(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu_erf(x):
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def attention(x, p, heads, causal):
  b, n, d = x.shape
  hd = d // heads
  qkv = dense(x, p["in_proj"])
  q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
  out = np.zeros_like(x)
  for h in range(heads):
    sl = slice(h * hd, (h + 1) * hd)
    logits = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / math.sqrt(hd)
    if causal:
      logits = logits + np.triu(np.full((n, n), -np.inf), 1)
    logits = logits - logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(-1, keepdims=True)
    out[..., sl] = w @ v[..., sl]
  return dense(out, p["out_proj"])


def transformer(x, p, heads, causal=False):
  i = 0
  while f"resblocks_{i}" in p:
    blk = p[f"resblocks_{i}"]
    x = x + attention(layer_norm(x, blk["ln_1"]), blk["attn"], heads, causal)
    h = gelu_erf(dense(layer_norm(x, blk["ln_2"]), blk["mlp"]["c_fc"]))
    x = x + dense(h, blk["mlp"]["c_proj"])
    i += 1
  return x


def vision(images, p, patch, heads):
  """images [B,H,W,3] -> (CLS @ proj, tokens after ln_post)."""
  b, hgt, wid, _ = images.shape
  g = hgt // patch
  patches = images.reshape(b, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, g * g, patch * patch * 3)
  kernel = p["conv1"]["kernel"].reshape(patch * patch * 3, -1)  # HWIO flattened
  x = patches @ kernel
  cls = np.broadcast_to(p["class_embedding"], (b, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + p["positional_embedding"]
  x = layer_norm(x, p["ln_pre"])
  x = transformer(x, p["transformer"], heads)
  x = layer_norm(x, p["ln_post"])
  return x[:, 0] @ p["proj"], x


def text(tokens, p, heads):
  x = p["token_embedding"]["embedding"][tokens] + p["positional_embedding"]
  x = transformer(x, p["transformer"], heads, causal=True)
  x = layer_norm(x, p["ln_final"])
  eot = tokens.argmax(-1)
  return x[np.arange(len(tokens)), eot] @ p["text_projection"]


def class_head(patch_mean, p):
  return dense(layer_norm(patch_mean, p["ln"]), p["dense"])


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x, axis=-1):
  m = x.max(axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis, keepdims=True))


def clip_loss(zimg, ztxt, scale):
  logits = scale * zimg @ ztxt.T
  n = len(logits)
  i2t = -np.mean([log_softmax(logits[i])[i] for i in range(n)])
  t2i = -np.mean([log_softmax(logits[:, i])[i] for i in range(n)])
  return (i2t + t2i) / 2


def siglip_loss(zimg, ztxt, scale, bias):
  logits = scale * zimg @ ztxt.T + bias
  total = 0.0
  for i in range(len(logits)):
    for j in range(len(logits)):
      y = 1.0 if i == j else -1.0
      total += math.log(1.0 / (1.0 + math.exp(-y * logits[i, j])))
  return -total / len(logits)


def idf_class_loss(logits, targets, idf):
  total = 0.0
  for row_logits, row_t in zip(logits, targets):
    w = row_t * idf
    s = w.sum()
    if s > 0:
      total += -(w / s * log_softmax(row_logits)).sum()
  return total / len(logits)
