"""Image-text retrieval: Recall@K in both directions, with several captions per image.

image_to_text_R@K: the fraction of images (with at least one caption) for which one of their
captions is among the K best-scoring captions of the whole set. text_to_image_R@K: the fraction
of captions whose image is among the K best-scoring images. Scores are cosine similarities.
A tie counts against the model: a wrong candidate that scores exactly as high as the best right
one is ranked above it (so a model that scores everything equally has recall 0 for K below
the number of wrong candidates), and NaN scores are never hits. Names as in OpenCLIP's logs.

    config.evals.retrieval_coco = dict(
        type='retrieval', every_steps=2000, batch_size=256,
        data='tfds:coco_captions:test', max_captions=5)  # COCO 5k (Karpathy)
    config.evals.retrieval_flickr = dict(
        type='retrieval',  # Flickr30k 1k
        data='karpathy:/data/flickr30k/dataset_flickr30k.json?image_dir=/data/flickr30k/images')

Fields: the keyword-only arguments of `RetrievalEvaluator` (docs/evaluation.md).
"""
from __future__ import annotations

import numpy as np

from superclip_jax.evaluators import common, eval_data, summary

# Each similarity block holds at most this many scores (64 MB of float32).
_BLOCK = 1 << 24


def retrieval_ranks(zimg: np.ndarray, ztxt: np.ndarray,
                    text_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ranks of the right answers (0 = first) for every image and every caption.

  Args:
    zimg: [images, embed] image embeddings; ztxt: [captions, embed] caption embeddings.
    text_image: [captions] int, the image each caption belongs to.
  Returns:
    (image_ranks [images]: wrong captions scoring >= the image's best caption; images without
     captions get -1, text_ranks [captions]: other images scoring >= the caption's image).
  """
  zimg = np.asarray(zimg, np.float32)
  ztxt = np.asarray(ztxt, np.float32)
  text_image = np.asarray(text_image)
  n, m = len(zimg), len(ztxt)
  image_ranks = np.full((n,), -1, np.int64)
  rows = max(1, _BLOCK // max(m, 1))
  for start in range(0, n, rows):
    sim = zimg[start:start + rows] @ ztxt.T  # [rows, captions]
    right = text_image[None, :] == np.arange(start, start + len(sim))[:, None]
    best = np.where(right, sim, -np.inf).max(axis=1, keepdims=True)
    has = right.any(axis=1)
    ranks = np.sum(~(sim < best) & ~right, axis=1)
    image_ranks[start:start + len(sim)] = np.where(has, ranks, -1)
  text_ranks = np.empty((m,), np.int64)
  cols = max(1, _BLOCK // max(n, 1))
  for start in range(0, m, cols):
    sim = zimg @ ztxt[start:start + cols].T  # [images, cols]
    owner = text_image[start:start + cols]
    true = sim[owner, np.arange(len(owner))]
    wrong = np.arange(n)[:, None] != owner[None, :]
    text_ranks[start:start + cols] = np.sum(~(sim < true[None, :]) & wrong, axis=0)
  return image_ranks, text_ranks


def recall_at_k(image_ranks: np.ndarray, text_ranks: np.ndarray, ks=(1, 5, 10)) -> dict:
  """{'image_to_text_R@K', 'text_to_image_R@K'} as fractions, from `retrieval_ranks`."""
  queries = image_ranks[image_ranks >= 0]
  out = {}
  for k in ks:
    out[f"image_to_text_R@{k}"] = float(np.mean(queries < k)) if len(queries) else 0.0
  for k in ks:
    out[f"text_to_image_R@{k}"] = float(np.mean(text_ranks < k)) if len(text_ranks) else 0.0
  return out


class RetrievalEvaluator:
  """Recall@K of image-to-text and text-to-image retrieval over `data`.

  Args (fields of the eval's config; defaults in the signature):
    data: image-text eval data (`eval_data`); the demo: its 'retrieval' split, two captions
      per image (short and long).
    batch_size: global image batch, a multiple of the device and process counts.
    max_captions: the first K captions of each image are used (None: 5; the demo: 2).
    caption_index: use only caption i of each image (None: all K); the demo: 0 = its short
      caption, 1 = its long one. Images without that caption are not queries.
    num_examples: the first n images (None: all; the demo renders 512).
    ks: the K of the Recall@K reported.
  """
  needs_text = True

  def __init__(self, config, model, mesh, *, data: str = "demo", batch_size: int = 256,
               max_captions: int | None = None, caption_index: int | None = None,
               num_examples: int | None = None, ks=(1, 5, 10)):
    self.config = config
    self.mesh = mesh
    self.data = eval_data.parse(data, eval_data.CAPTIONS)
    self.batch_size = int(batch_size)
    if max_captions is None:
      max_captions = 2 if self.data.kind == "demo" else 5
    self.max_captions = int(max_captions)
    if caption_index is not None and not 0 <= caption_index < self.max_captions:
      raise ValueError(f"retrieval eval: caption_index={caption_index} is not one of the "
                       f"{self.max_captions} captions kept (max_captions): use 0 to "
                       f"{self.max_captions - 1}, or raise max_captions")
    self.caption_index = caption_index
    self.num_examples = num_examples
    self.ks = tuple(ks)
    common.local_batch_size(self.batch_size, mesh)

    def encode(params, batch):
      zimg, _ = model.apply({"params": params}, batch["image"], method="encode_image")
      tokens = batch["tokens"]  # [b, K, context]
      b, k, context = tokens.shape
      ztxt = model.apply({"params": params}, tokens.reshape(b * k, context),
                         method="encode_text")
      return {"zimg": zimg, "ztxt": ztxt.reshape(b, k, -1)}

    self._encode = common.BatchedFn(encode, mesh, keep=("caption_mask", "bad"))

  def run(self, params) -> dict:
    local = common.local_batch_size(self.batch_size, self.mesh)
    ds = eval_data.image_text_data(self.data, self.config, local, self.max_captions,
                                   self.num_examples)
    out = self._encode(params, ds, self.batch_size)
    mask, ztxt = out["caption_mask"], out["ztxt"]  # [images, K], [images, K, embed]
    if self.caption_index is not None:
      keep = slice(self.caption_index, self.caption_index + 1)
      mask, ztxt = mask[:, keep], ztxt[:, keep]
    ztxt = ztxt[mask]
    text_image = np.nonzero(mask)[0]
    image_ranks, text_ranks = retrieval_ranks(out["zimg"], ztxt, text_image)
    metrics = recall_at_k(image_ranks, text_ranks, self.ks)
    metrics["num_images"] = float(len(out["zimg"]))
    metrics["num_captions"] = float(len(ztxt))
    metrics["num_bad_images"] = float(np.sum(out["bad"]))
    return metrics

  def chance_levels(self, metrics: dict) -> dict:
    """R@K for the smallest and largest K in both directions against random scores (the
    run-end summary): `summary.retrieval_chance` with the mean caption count per image."""
    images, captions = metrics["num_images"], metrics["num_captions"]
    if not images or not captions:
      return {}
    ks = sorted({min(self.ks), max(self.ks)})
    return ({f"image_to_text_R@{k}": summary.retrieval_chance(captions, captions / images, k)
             for k in ks}
            | {f"text_to_image_R@{k}": summary.retrieval_chance(images, 1, k) for k in ks})
