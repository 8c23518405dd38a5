"""Image-text retrieval: Recall@K in both directions, with several captions per image.

image_to_text_R@K: the fraction of images (with at least one caption) for which one of their
captions is among the K best-scoring captions of the whole set. text_to_image_R@K: the fraction
of captions whose image is among the K best-scoring images. Scores are cosine similarities.
A tie counts against the model: a wrong candidate that scores exactly as high as the best right
one is ranked above it (so a model that scores everything equally has recall 0 for K below
the number of wrong candidates), and NaN scores are never hits. Names as in OpenCLIP's logs.

    config.evals.retrieval_coco = dict(
        type='retrieval', every_steps=2000, batch_size=256,
        data=dict(source='tfds', name='coco_captions', split='test'),  # COCO 5k (Karpathy)
        max_captions=5)
    config.evals.retrieval_flickr = dict(
        type='retrieval', data=dict(source='karpathy_json', split='test',
                                    path='/data/flickr30k/dataset_flickr30k.json',
                                    image_dir='/data/flickr30k/images'))  # Flickr30k 1k
"""
from __future__ import annotations

import numpy as np

from superclip_jax.evaluators import common, eval_data

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
  """Fields: data ('demo': the demo's 'retrieval' split, 2 captions per image), batch_size
  (256), max_captions (5; the demo: 2), num_examples (all; the demo: 512), ks ((1, 5, 10))."""

  def __init__(self, eval_config, config, model, mesh):
    self.config = config
    self.mesh = mesh
    self.data = eval_data.as_dict(eval_config.get("data", "demo"))
    self.batch_size = int(eval_config.get("batch_size", 256))
    self.max_captions = int(eval_config.get(
        "max_captions", 2 if self.data["source"] == "demo" else 5))
    self.num_examples = eval_config.get("num_examples")
    self.ks = tuple(eval_config.get("ks", (1, 5, 10)))
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
    mask = out["caption_mask"]  # [images, K]
    ztxt = out["ztxt"][mask]
    text_image = np.nonzero(mask)[0]
    image_ranks, text_ranks = retrieval_ranks(out["zimg"], ztxt, text_image)
    metrics = recall_at_k(image_ranks, text_ranks, self.ks)
    metrics["num_images"] = float(len(out["zimg"]))
    metrics["num_captions"] = float(len(ztxt))
    metrics["num_bad_images"] = float(np.sum(out["bad"]))
    return metrics
