"""Python inference API: a trained workdir as embeddings, zero-shot scores and image tags.

    from superclip_jax import inference
    model = inference.load('/path/to/workdir')            # latest checkpoint; step=N for another
    x = np.stack([model.preprocess(img) for img in images])  # decoded uint8 [H, W, 3] each
    zimg = model.encode_image(x)                          # [B, embed], L2-normalised
    ztxt = model.encode_text(model.tokenize(['a cat', 'a dog']))
    probs = model.zero_shot(x, ['a cat', 'a dog'])         # [B, 2]
    model.tags(x, k=10)   # the class head's top-10 vocabulary tokens per image (SuperCLIP only)

SuperCLIP's class head predicts, for an image, which tokens its caption would contain: a free
image tagger that plain CLIP does not have. `tags` reports the head's softmax over the
vocabulary without the start/end-of-text and padding ids.

Inputs are padded to the next power of two (at most `max_batch` rows per call), so a handful
of shapes are compiled whatever the batch sizes; outputs are numpy.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from superclip_jax import checkpoint, models, sharding, tokenizer
from superclip_jax.data import spec, transforms

# Ids that are never tags: they are in every caption (SOT, EOT) or padding (0, also '!').
SPECIAL_IDS = (tokenizer.SOT_ID, tokenizer.EOT_ID, tokenizer.PAD_ID)


@dataclasses.dataclass(frozen=True)
class Tag:
  token_id: int
  name: str  # tokenizer.token_names: 'dog' for 'dog</w>', 'phot@@' for a word piece
  score: float  # the head's probability for the token (softmax over the vocabulary)


class Model:
  """A trained model's params and its jitted encoders, on one device."""

  def __init__(self, config, params, step: int | None = None, dtype=None,
               max_batch: int = 256):
    self.config = config
    self.step = step
    self.mode = config.model.mode
    self.image_size = int(config.model.image_size)
    self.context_length = int(config.model.context_length)
    self.max_batch = int(max_batch)
    self.module = models.model_from_config(config.model, dtype=dtype)
    self.params = jax.device_put(params, jax.devices()[0])
    apply = self.module.apply

    def encode_image(params, images, normalize):
      z, patch_mean = apply({"params": params}, images, normalize=normalize,
                            method="encode_image")
      return z.astype(jnp.float32), patch_mean

    self._encode_image = jax.jit(encode_image, static_argnums=2)
    self._encode_text = jax.jit(
        lambda p, t, normalize: apply({"params": p}, t, normalize=normalize,
                                      method="encode_text").astype(jnp.float32),
        static_argnums=2)
    self._class_logits = jax.jit(lambda p, x: apply(
        {"params": p}, apply({"params": p}, x, method="encode_image")[1], method="classify"))

  # --- inputs --------------------------------------------------------------------------------

  def preprocess(self, image) -> np.ndarray:
    """A decoded image -> float32 [S, S, 3]: OpenCLIP's eval transform (shortest side to S,
    bicubic, centre crop, RGB, CLIP normalisation), pixel for pixel.

    image: uint8 [H, W, 3] (grey [H, W] / [H, W, 1] and RGBA [H, W, 4] too) or a PIL image.
    """
    from PIL import Image
    if not isinstance(image, Image.Image):
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
          image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"preprocess takes a decoded uint8 image [H, W, 3] (or grey / RGBA) "
                         f"or a PIL image, got {image.dtype} {image.shape}")
      image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1
                              else image)
    pixels = transforms.eval_image(image, self.image_size)
    return ((pixels.astype(np.float32) / 255.0 - transforms.CLIP_MEAN)
            / transforms.CLIP_STD).astype(np.float32)

  def tokenize(self, texts) -> np.ndarray:
    """int32 [len(texts), context_length] with the model's context length."""
    return tokenizer.tokenize(texts, self.context_length)

  # --- encoders ------------------------------------------------------------------------------

  def encode_image(self, images, normalize: bool = True) -> np.ndarray:
    """float32 [B, H, W, 3] CLIP-normalised images (see `preprocess`) -> [B, embed]."""
    images = self._check_images(images)
    return self._batched(lambda x: self._encode_image(self.params, x, normalize)[0], images)

  def encode_text(self, token_ids, normalize: bool = True) -> np.ndarray:
    """int32 [B, context_length] token ids (see `tokenize`) -> [B, embed]."""
    if not self.module.has_text:
      raise ValueError("this model has no text tower (model.mode='superclass')")
    tokens = np.asarray(token_ids)
    if tokens.ndim != 2 or tokens.shape[1] != self.context_length or \
        not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"token_ids must be int [batch, {self.context_length}], got "
                       f"{tokens.dtype} {tokens.shape}; use model.tokenize(texts)")
    return self._batched(lambda t: self._encode_text(self.params, t, normalize),
                         tokens.astype(np.int32))

  def class_logits(self, images) -> np.ndarray:
    """float32 [B, H, W, 3] images -> the class head's logits [B, vocab]."""
    if not self.module.has_head:
      raise ValueError("this model has no class head (model.mode='clip'); train with "
                       "model.mode='superclip' or 'superclass' for tags")
    return self._batched(lambda x: self._class_logits(self.params, x),
                         self._check_images(images))

  def tags(self, images, k: int = 10) -> list[list[Tag]]:
    """The head's k most probable vocabulary tokens for each image, best first.

    Probabilities are the head's softmax over the vocabulary without SOT, EOT and padding.
    """
    logits = self.class_logits(images)
    logits[:, list(SPECIAL_IDS)] = -np.inf
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(int(k), probs.shape[1] - len(SPECIAL_IDS))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for row, ids in zip(probs, top):
      names = tokenizer.token_names(ids)
      out.append([Tag(int(i), n, float(row[i])) for i, n in zip(ids, names)])
    return out

  def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = ("{}",)):
    """[len(labels), embed]: each label's prompts encoded, averaged, L2-normalised (CLIP's
    prompt ensemble; the default template is the label itself)."""
    templates = spec.check_templates(templates, "templates")
    prompts = [t.format(label) for label in labels for t in templates]
    z = self.encode_text(self.tokenize(prompts)).reshape(len(labels), len(templates), -1)
    z = z.mean(axis=1)
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

  def zero_shot(self, images, labels: Sequence[str],
                templates: Sequence[str] = ("{}",)) -> np.ndarray:
    """[B, len(labels)] probabilities of each label for each image.

    Softmax models: softmax over the labels of logit_scale * cosine similarity (rows sum to
    1). Sigmoid (SigLIP) models: each label's own sigmoid(logit_scale * cos + logit_bias).
    """
    if not len(labels):
      raise ValueError("zero_shot needs at least one label")
    zcls = self.class_embeddings(labels, templates)  # raises first for a model without text
    logits = self.logit_scale * (self.encode_image(images) @ zcls.T)
    if self.logit_bias is not None:
      return 1.0 / (1.0 + np.exp(-(logits + self.logit_bias)))
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)

  @property
  def logit_scale(self) -> float:
    return float(np.exp(self.params["logit_scale"]))

  @property
  def logit_bias(self) -> float | None:
    return float(self.params["logit_bias"]) if "logit_bias" in self.params else None

  # --- helpers -------------------------------------------------------------------------------

  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    s = self.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
      raise ValueError(f"images must be float32 [batch, {s}, {s}, 3] (CLIP-normalised; see "
                       f"preprocess), got {images.dtype} {images.shape}")
    if images.dtype == np.uint8:
      raise ValueError("images are uint8: pass each through model.preprocess first")
    return images.astype(np.float32)

  def _batched(self, fn, x: np.ndarray) -> np.ndarray:
    """fn over chunks of <= max_batch rows, each padded to a power of two."""
    outs = []
    for start in range(0, len(x), self.max_batch):
      chunk = x[start:start + self.max_batch]
      n = len(chunk)
      size = min(self.max_batch, 1 << max(0, (n - 1).bit_length()))
      padded = np.concatenate([chunk, np.zeros((size - n,) + chunk.shape[1:], chunk.dtype)])
      outs.append(np.asarray(fn(padded))[:n])
    if not outs:
      raise ValueError("empty batch")
    return np.concatenate(outs)


def load(workdir: str, step: int | None = None, dtype=None, max_batch: int = 256) -> Model:
  """The model of a workdir's checkpoint (the latest unless `step`), on the first device.

  dtype: compute dtype override (e.g. 'float32' on CPUs; default: the run's config).
  """
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), jax.devices()[:1])
  config, _, state = checkpoint.load_state(workdir, step, mesh=mesh)
  return Model(config, state.params, step=int(state.step), dtype=dtype, max_batch=max_batch)
