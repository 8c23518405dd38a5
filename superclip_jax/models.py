"""SuperCLIP in flax linen: OpenCLIP's image and text towers plus the token-classification head.

The towers are numerically identical to OpenCLIP's `VisionTransformer` and `TextTransformer`
(exact-erf GELU, LayerNorm eps 1e-5, pre-norm blocks, fused q/k/v projection), and parameter
names follow OpenCLIP's state dict so that export is a renaming plus transposes:

    visual/conv1/kernel            [p, p, 3, width]       (torch: conv1.weight OIHW)
    visual/class_embedding         [width]
    visual/positional_embedding    [1 + grid**2, width]
    visual/{ln_pre,ln_post}/{scale,bias}
    visual/transformer/resblocks_{i}/{ln_1,attn,ln_2,mlp}/...
                                   (scan_layers=True: resblocks/..., stacked [layers, ...])
    visual/proj                    [width, embed_dim]      (used as x @ proj)
    text/token_embedding/embedding [vocab, width]
    text/positional_embedding      [context, width]
    text/transformer/resblocks_{i}/...
    text/ln_final/{scale,bias}
    text/text_projection           [width, embed_dim]      (OpenCLIP: top-level)
    class_head/{blocks_{i}, ln, dense}/...                  (SuperCLIP only)
    logit_scale, logit_bias                                 (logit_bias: SigLIP only)

Parameters are float32; `dtype` is the compute dtype (bfloat16 on accelerators). Attention
logits, softmax and every LayerNorm statistic are computed in float32.

`scan_layers=True` runs each tower's blocks as one `nn.scan` over a single block (XLA compiles
one block instead of `layers` copies); its parameters are those of the per-layer model stacked
along a leading [layers] axis (`stack_layers` / `unstack_layers` convert, exactly). Numerics
are the same either way. `remat_policy` rematerialises each block in the backward pass.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from superclip_jax import attention as attention_lib
from superclip_jax.scan_layout import STACKED_BLOCKS

LN_EPS = 1e-5
MODES = ("superclip", "clip", "superclass")


def has_text(mode: str) -> bool:
  """Whether `mode` has a text tower (and so a contrastive loss): not SuperClass."""
  return mode != "superclass"


def has_head(mode: str) -> bool:
  """Whether `mode` has the token-classification head: not plain CLIP."""
  return mode != "clip"


@dataclasses.dataclass(frozen=True)
class TowerSize:
  width: int
  layers: int
  heads: int
  mlp_ratio: float = 4.0


# ViT sizes by name; 'mu' and 'Ti' are for tests and the demo.
VIT_SIZES = {
    "mu": TowerSize(width=64, layers=2, heads=2),
    "Ti": TowerSize(width=192, layers=12, heads=3),
    "demo": TowerSize(width=128, layers=3, heads=4),
    "S": TowerSize(width=384, layers=12, heads=6),
    "B": TowerSize(width=768, layers=12, heads=12),
    "L": TowerSize(width=1024, layers=24, heads=16),
    "H": TowerSize(width=1280, layers=32, heads=16),
}
# OpenCLIP's text tower and embedding width that go with each image tower.
TEXT_SIZES = {
    "mu": TowerSize(width=64, layers=2, heads=2),
    "Ti": TowerSize(width=256, layers=6, heads=4),
    "demo": TowerSize(width=96, layers=2, heads=2),
    "S": TowerSize(width=384, layers=12, heads=6),
    "B": TowerSize(width=512, layers=12, heads=8),
    "L": TowerSize(width=768, layers=12, heads=12),
    "H": TowerSize(width=1024, layers=24, heads=16),
}
EMBED_DIMS = {"mu": 32, "Ti": 256, "demo": 96, "S": 384, "B": 512, "L": 768, "H": 1024}


def parse_variant(variant: str) -> tuple[str, int]:
  """'B/16' -> ('B', 16). Raises ValueError naming the known sizes."""
  m = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not m or m.group(1) not in VIT_SIZES:
    raise ValueError(
        f"Unknown model variant {variant!r}: expected SIZE/PATCH with SIZE one of "
        f"{sorted(VIT_SIZES)} (e.g. 'B/16', 'L/14').")
  return m.group(1), int(m.group(2))


def _gelu(x, quick: bool):
  if quick:  # OpenAI's original weights and OpenCLIP's *-quickgelu configs.
    return x * jax.nn.sigmoid(1.702 * x)
  return nn.gelu(x, approximate=False)


@jax.custom_vjp
def add_bias(y, bias):
  """y [..., features] + bias [features]; the bias gradient a matrix-vector product.

  Autodiff would sum the output gradient over every leading row (a column reduction), which
  XLA:CPU runs an order of magnitude slower than the same sum as ones @ g: for the class
  head's [128, 49408] gradient that was a fifth of the study's mu/8 train step
  (docs/performance.md). The sum accumulates in float32 whatever the dtype.
  """
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, g):
  rows = g.reshape(-1, g.shape[-1])
  dbias = jnp.dot(jnp.ones((rows.shape[0],), rows.dtype), rows,
                  precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return g, dbias.astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nn.Module):
  """`flax.linen.Dense` (same parameters, initialisers and dtype promotion) with `add_bias`.

  The class head's layer only: there it makes the study's SuperCLIP step (mu/8) 12% faster at
  batch 128 and 7% at 16. In the towers XLA fuses autodiff's bias sums with the residual
  stream's gradient additions, which `add_bias` would split apart: their CLIP step was 21%
  slower with it at batch 128, 11% at 16 (each pair timed alternately in one process)."""
  features: int
  dtype: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return add_bias(y, bias)


def _layer_norm(name: Optional[str] = None) -> nn.LayerNorm:
  # Statistics in float32 whatever the compute dtype; output cast back by the next layer.
  return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name)


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention as OpenCLIP uses it: fused q/k/v `in_proj`, then `out_proj`.

  `in_proj.kernel` is [width, 3*width] with columns q, then k, then v; heads are contiguous
  slices of each. Inputs [batch, length, width]; `causal`: each position attends only to
  itself and earlier ones (the text tower). `attention`: the implementation (`attention.py`).
  """
  heads: int
  dtype: Any = jnp.float32
  in_init: Any = nn.initializers.lecun_normal()
  out_init: Any = nn.initializers.lecun_normal()
  causal: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    head_dim = width // self.heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, kernel_init=self.in_init, name="in_proj")(x)
    qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    out = attention_lib.dot_product_attention(q, k, v, causal=self.causal,
                                              implementation=self.attention)
    out = out.reshape(batch, length, width)
    return nn.Dense(width, dtype=self.dtype, kernel_init=self.out_init, name="out_proj")(out)


class Mlp(nn.Module):
  """OpenCLIP's block MLP: c_fc -> GELU -> c_proj."""
  hidden: int
  quick_gelu: bool = False
  dtype: Any = jnp.float32
  fc_init: Any = nn.initializers.lecun_normal()
  proj_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=self.fc_init, name="c_fc")(x)
    h = _gelu(h, self.quick_gelu)
    return nn.Dense(width, dtype=self.dtype, kernel_init=self.proj_init, name="c_proj")(h)


class ResidualAttentionBlock(nn.Module):
  """Pre-norm block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""
  size: TowerSize
  quick_gelu: bool = False
  dtype: Any = jnp.float32
  causal: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    width, layers = self.size.width, self.size.layers
    # OpenCLIP's text-tower init (GPT-2 style), used for both towers here.
    attn_std = width ** -0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    normal = nn.initializers.normal
    y = _layer_norm("ln_1")(x).astype(self.dtype)
    x = x + MultiheadAttention(self.size.heads, self.dtype, normal(attn_std), normal(proj_std),
                               self.causal, self.attention, name="attn")(y)
    y = _layer_norm("ln_2")(x).astype(self.dtype)
    x = x + Mlp(int(width * self.size.mlp_ratio), self.quick_gelu, self.dtype, normal(fc_std),
                normal(proj_std), name="mlp")(y)
    return x




class _ScanBody(ResidualAttentionBlock):
  """The block as nn.scan's body: carry x -> (x, no per-layer output)."""

  def __call__(self, x):
    return super().__call__(x), None


# jax.checkpoint_policies usable by name (the others are factories that need arguments).
_NAMED_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                   "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
CHECKPOINT_POLICIES = tuple(n for n in _NAMED_POLICIES if hasattr(jax.checkpoint_policies, n))
REMAT_POLICIES = ("none", "full") + CHECKPOINT_POLICIES


def check_remat_policy(remat_policy: str) -> None:
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy={remat_policy!r}: use one of "
                     f"{list(REMAT_POLICIES)}")


def checkpoint_policy(remat_policy: str):
  """config.model.remat_policy (not 'none') -> nn.remat's policy ('full': None, save nothing)."""
  check_remat_policy(remat_policy)
  return None if remat_policy == "full" else getattr(jax.checkpoint_policies, remat_policy)


class Transformer(nn.Module):
  """`size.layers` blocks: named resblocks_{i}, or one scanned `resblocks` (scan_layers)."""
  size: TowerSize
  quick_gelu: bool = False
  dtype: Any = jnp.float32
  remat_policy: str = "none"  # 'none' | 'full' | a name in CHECKPOINT_POLICIES
  scan_layers: bool = False
  causal: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    block = _ScanBody if self.scan_layers else ResidualAttentionBlock
    if self.remat_policy != "none":
      # Inside a scan the loop already keeps XLA from merging the recomputation back into the
      # forward pass, so prevent_cse's extra barriers are only needed for unrolled layers.
      block = nn.remat(block, policy=checkpoint_policy(self.remat_policy),
                       prevent_cse=not self.scan_layers)
    if self.scan_layers:
      # Each layer gets its own init RNG (split_rngs), so per-layer init distributions are the
      # unrolled model's.
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=self.size.layers)
      x, _ = blocks(self.size, self.quick_gelu, self.dtype, self.causal, self.attention,
                    name=STACKED_BLOCKS)(x)
      return x
    for i in range(self.size.layers):
      x = block(self.size, self.quick_gelu, self.dtype, self.causal, self.attention,
                name=f"resblocks_{i}")(x)
    return x


class VisionTransformer(nn.Module):
  """OpenCLIP's VisionTransformer. Returns (CLS after ln_post @ proj [B, embed], all tokens
  after ln_post [B, 1 + kept patches, width])."""
  size: TowerSize
  patch: int
  image_size: int
  embed_dim: int
  quick_gelu: bool = False
  patch_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False):
    width = self.size.width
    scale = width ** -0.5
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"images must be [batch, {self.image_size}, {self.image_size}, 3], "
                       f"got {images.shape}")
    x = nn.Conv(width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", use_bias=False, dtype=self.dtype, name="conv1")(
                    images.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, -1, width)
    grid = self.image_size // self.patch
    cls = self.param("class_embedding", nn.initializers.normal(scale), (width,))
    pos = self.param("positional_embedding", nn.initializers.normal(scale),
                     (1 + grid * grid, width))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
    if train and self.patch_dropout > 0:
      x = _patch_dropout(x, self.patch_dropout, self.make_rng("patch_dropout"))
    x = _layer_norm("ln_pre")(x).astype(self.dtype)
    x = Transformer(self.size, self.quick_gelu, self.dtype, self.remat_policy,
                    self.scan_layers, attention=self.attention, name="transformer")(x)
    x = _layer_norm("ln_post")(x)
    proj = self.param("proj", nn.initializers.normal(scale), (width, self.embed_dim))
    return x[:, 0] @ proj, x


def _patch_dropout(tokens, prob: float, rng):
  """FLIP: keep the CLS token and a random subset of max(1, int(n * (1 - prob))) patches."""
  batch, length, width = tokens.shape
  num_patches = length - 1
  keep = max(1, int(num_patches * (1.0 - prob)))
  noise = jax.random.uniform(rng, (batch, num_patches))
  idx = jnp.argsort(noise, axis=-1)[:, :keep]
  patches = jnp.take_along_axis(tokens[:, 1:], idx[..., None], axis=1)
  return jnp.concatenate([tokens[:, :1], patches], axis=1)


class TextTransformer(nn.Module):
  """OpenCLIP's TextTransformer: causal, pooled at the EOT position (argmax of the ids)."""
  size: TowerSize
  embed_dim: int
  vocab_size: int = 49408
  context_length: int = 77
  quick_gelu: bool = False
  dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, tokens):
    """tokens int32 [B, context] -> EOT features after ln_final @ text_projection [B, embed]."""
    if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
      raise ValueError(f"tokens must be [batch, {self.context_length}], got {tokens.shape}")
    x = nn.Embed(self.vocab_size, self.size.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(tokens).astype(self.dtype)
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (self.context_length, self.size.width))
    x = x + pos.astype(self.dtype)
    x = Transformer(self.size, self.quick_gelu, self.dtype, self.remat_policy,
                    self.scan_layers, causal=True, attention=self.attention,
                    name="transformer")(x)
    x = _layer_norm("ln_final")(x)
    eot = jnp.argmax(tokens, axis=-1)  # EOT (49407) is the largest id; first maximum.
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    proj = self.param("text_projection", nn.initializers.normal(self.size.width ** -0.5),
                      (self.size.width, self.embed_dim))
    return pooled @ proj


class ClassHead(nn.Module):
  """SuperCLIP's head: [optional residual MLP blocks] -> LayerNorm -> Dense(width -> vocab)."""
  vocab_size: int = 49408
  num_blocks: int = 0
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    for i in range(self.num_blocks):
      y = _layer_norm(f"blocks_{i}_ln")(x).astype(self.dtype)
      x = x + Mlp(int(width * self.mlp_ratio), self.quick_gelu, self.dtype, name=f"blocks_{i}")(y)
    x = _layer_norm("ln")(x).astype(self.dtype)
    logits = Dense(self.vocab_size, dtype=self.dtype,
                   kernel_init=nn.initializers.normal(width ** -0.5),
                   bias_init=nn.initializers.zeros, name="dense")(x)
    return logits.astype(jnp.float32)


class SuperCLIP(nn.Module):
  """CLIP, SuperCLIP or SuperClass, by `mode`.

  __call__(images [B,H,W,3] float, tokens [B,context] int32) returns a dict with
    zimg [B, embed] and ztxt [B, embed] (L2-normalised; ztxt absent in 'superclass'),
    class_logits [B, vocab] float32 (absent in 'clip'),
    logit_scale (exp of the parameter, a scalar) and logit_bias (SigLIP only).
  """
  mode: str = "superclip"
  variant: str = "B/16"
  image_size: int = 224
  embed_dim: Optional[int] = None  # default: OpenCLIP's for the variant's size
  text_size: Optional[str] = None  # default: the variant's size
  vocab_size: int = 49408
  context_length: int = 77
  quick_gelu: bool = False
  patch_dropout: float = 0.0
  head_blocks: int = 0
  head_mlp_ratio: float = 4.0
  logit_bias: Optional[float] = None  # init value; None = no bias parameter (softmax CLIP)
  logit_scale_init: float = math.log(1 / 0.07)
  dtype: Any = jnp.float32
  remat_policy: str = "none"  # 'none' | 'full' | a name in CHECKPOINT_POLICIES
  scan_layers: bool = False  # one nn.scan over the blocks of each tower (see stack_layers)
  attention: str = "auto"  # 'auto' | 'xla' | 'jax' | 'cudnn': attention.py

  @property
  def has_text(self) -> bool:
    return has_text(self.mode)

  @property
  def has_head(self) -> bool:
    return has_head(self.mode)

  def setup(self):
    if self.mode not in MODES:
      raise ValueError(f"model.mode must be one of {MODES}, got {self.mode!r}")
    size, patch = parse_variant(self.variant)
    if self.image_size % patch:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch {patch}")
    embed = self.embed_dim or EMBED_DIMS[size]
    self.visual = VisionTransformer(VIT_SIZES[size], patch, self.image_size, embed,
                                    self.quick_gelu, self.patch_dropout, self.dtype,
                                    self.remat_policy, self.scan_layers, self.attention)
    if self.has_text:
      if (self.text_size or size) not in TEXT_SIZES:
        raise ValueError(f"model.text_size must be one of {sorted(TEXT_SIZES)}")
      self.text = TextTransformer(TEXT_SIZES[self.text_size or size], embed, self.vocab_size,
                                  self.context_length, self.quick_gelu, self.dtype,
                                  self.remat_policy, self.scan_layers, self.attention)
      self.logit_scale = self.param("logit_scale", nn.initializers.constant(
          self.logit_scale_init), ())
      if self.logit_bias is not None:
        self.logit_bias_param = self.param("logit_bias",
                                           nn.initializers.constant(self.logit_bias), ())
    if self.has_head:
      self.class_head = ClassHead(self.vocab_size, self.head_blocks, self.head_mlp_ratio,
                                  self.quick_gelu, self.dtype)

  def encode_image(self, images, train: bool = False, normalize: bool = True):
    """-> (image embedding [B, embed], patch-token mean [B, width] for the head)."""
    z, tokens = self.visual(images, train)
    patch_mean = jnp.mean(tokens[:, 1:], axis=1)  # CLS excluded: the head sees patches only.
    return (_l2_normalize(z) if normalize else z), patch_mean

  def encode_text(self, tokens, normalize: bool = True):
    """tokens int32 [B, context] -> text embedding [B, embed]."""
    if not self.has_text:
      raise ValueError("mode='superclass' has no text tower")
    z = self.text(tokens)
    return _l2_normalize(z) if normalize else z

  def classify(self, patch_mean):
    """patch-token mean [B, width] -> class logits [B, vocab] (float32)."""
    return self.class_head(patch_mean)

  def __call__(self, images, tokens=None, train: bool = False):
    zimg, patch_mean = self.encode_image(images, train)
    out = {"zimg": zimg}
    if self.has_text:
      out["ztxt"] = self.encode_text(tokens)
      out["logit_scale"] = jnp.exp(self.logit_scale)
      if self.logit_bias is not None:
        out["logit_bias"] = self.logit_bias_param
    if self.has_head:
      out["class_logits"] = self.classify(patch_mean)
    return out


def _l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def model_from_config(model_config, dtype=None) -> SuperCLIP:
  """Builds the module from `config.model` (a ConfigDict or mapping of SuperCLIP fields)."""
  kwargs = dict(model_config)
  if dtype is not None:
    kwargs["dtype"] = dtype
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  known = {f.name for f in dataclasses.fields(SuperCLIP)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f"Unknown config.model field(s) {unknown}; known: {sorted(known)}")
  return SuperCLIP(**kwargs)
