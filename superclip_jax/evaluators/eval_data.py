"""Eval data: this process's share of a labelled image set or an image-text set, as tf.data.

An eval's `data` field picks the source (fields in parentheses are optional):

  'demo' or dict(source='demo', (split))        the built-in demo's held-out splits
  dict(source='tfds', name, split, (data_dir, image_key='image', label_key='label',
       captions_key='captions/text'))            any TFDS dataset (imagenet2012, cifar10,
                                                 coco_captions, ...); '/' enters nested features
  dict(source='image_folder', path)             one sub-folder per class, classes in sorted
                                                 order: the ILSVRC val layout of the official
                                                 code (torchvision `ImageFolder`)
  dict(source='karpathy_json', path, image_dir, (split='test'))
                                                 Karpathy's dataset_{coco,flickr30k}.json: the
                                                 COCO 5k and Flickr30k 1k test splits
  dict(source='spec', spec)                     any input-pipeline data spec, e.g.
                                                 'wds:/data/val/{000..009}.tar?text=txt' (image-
                                                 text) or '...?label=cls' (labelled)

TFDS datasets, image folders and specs are read by the input pipeline's sources
(`data.sources`, `Source.eval_records`), which give each process its own part of the records;
the demo and Karpathy lists are split here into contiguous shares (`common.host_slice`).
Images are decoded and transformed on the host CPU by the input pipeline's eval transform
(`data.transforms.eval_record`: PIL, shortest side to the model's image size, bicubic, centre
crop — OpenCLIP's eval preprocessing pixel for pixel), then CLIP-normalised, and batched to
the local batch size (the last batch may be smaller; `common.BatchedFn` pads it).

Every example has a `bad` flag: an image that cannot be read or decoded stays in the
evaluation as a black image, so the number of examples never changes silently, and the
evaluators report how many there were (`num_bad_images`).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import tensorflow as tf

from superclip_jax import tokenizer
from superclip_jax.data import demo, sources, transforms
from superclip_jax.evaluators import common

# Each source and the fields it needs.
SOURCES = {"demo": (), "tfds": ("name", "split"), "image_folder": ("path",),
           "karpathy_json": ("path", "image_dir"), "spec": ("spec",)}


def as_dict(data) -> dict:
  """An eval's `data` field (a source name or a mapping) as a validated dict with `source`."""
  data = {"source": data} if isinstance(data, str) else dict(data)
  source = data.get("source")
  if source not in SOURCES:
    raise ValueError(f"eval data source {source!r}: use one of {tuple(SOURCES)} "
                     f"(e.g. data=dict(source='tfds', name='imagenet2012', split='validation'))")
  missing = [k for k in SOURCES[source] if not data.get(k)]
  if missing:
    raise ValueError(f"eval data {data}: source={source!r} needs {missing}")
  return data


def classification_data(data, config, local_batch: int,
                        num_examples: int | None = None) -> tf.data.Dataset:
  """This process's batches: image float32 [b, S, S, 3], bad bool [b], label fields int32 [b].

  Label fields: 'label' for tfds / image_folder / spec; for the demo one per attribute
  ('colour', 'shape', 'position'). `num_examples` keeps the first n (tfds; the demo renders n,
  default 512).
  """
  data = as_dict(data)
  source = data["source"]
  if source == "demo":
    ds = _demo(config, data.get("split", "zeroshot"), num_examples or 512,
               ("colour", "shape", "position"))
    return _batched(ds, local_batch)
  if source == "karpathy_json":
    raise ValueError("eval data source 'karpathy_json' has no class labels: use 'tfds', "
                     "'image_folder' or 'demo'")
  ds = _source_examples(data, num_examples, config.model.image_size,
                        label_key=data.get("label_key", "label"))
  ds = ds.map(lambda ex: {"image": ex["image"], "bad": ex["bad"], "label": ex["label"]})
  return _batched(ds, local_batch)


def image_text_data(data, config, local_batch: int, max_captions: int,
                    num_examples: int | None = None) -> tf.data.Dataset:
  """This process's batches: image float32 [b, S, S, 3], bad bool [b], tokens int32
  [b, K, context], caption_mask bool [b, K] (K = max_captions; the first K captions of each
  image are kept, fewer are padded and masked)."""
  data = as_dict(data)
  size, context = config.model.image_size, config.model.context_length
  source = data["source"]
  if source == "demo":
    ds = _demo(config, data.get("split", "retrieval"), num_examples or 512,
               ("caption", "long_caption"))
    ds = ds.map(lambda ex: {"image": ex["image"], "bad": ex["bad"],
                            "captions": tf.stack([ex["caption"], ex["long_caption"]])})
  else:
    if source == "image_folder":
      raise ValueError("eval data source 'image_folder' has no captions: use 'tfds', "
                       "'karpathy_json' or 'demo'")
    if source == "karpathy_json":
      ds = _karpathy_examples(data, num_examples, size)
    else:
      ds = _source_examples(data, num_examples, size,
                            text_key=data.get("captions_key", "captions/text"))
    ds = ds.map(lambda ex: {"image": ex["image"], "bad": ex["bad"], "captions": ex["texts"]})

  def fixed_captions(ex):
    captions = ex["captions"][:max_captions]
    n = tf.shape(captions)[0]
    captions = tf.concat([captions, tf.fill([max_captions - n], "")], 0)
    captions.set_shape([max_captions])
    return {**ex, "captions": captions, "caption_mask": tf.range(max_captions) < n}

  ds = ds.map(fixed_captions, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch).map(
      lambda b: {"image": b["image"], "bad": b["bad"], "caption_mask": b["caption_mask"],
                 "tokens": tokenizer.tf_tokenize(b["captions"], context)},
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(2)


# --- Records -> examples ---------------------------------------------------------------------


def _transformed(image_bytes, size: int) -> tuple[np.ndarray, bool]:
  """Encoded image -> (uint8 [size, size, 3], bad): the input pipeline's eval transform."""
  image, status = transforms.eval_record(image_bytes, size)
  return image, bool(status != transforms.OK)


# What the tf.numpy_function decoding a record returns: image, bad, label, texts.
_EXAMPLE_TYPES = [tf.uint8, tf.bool, tf.int32, tf.string]


def _finish_example(out, size: int) -> dict:
  image, bad, label, texts = out
  image.set_shape([size, size, 3])
  bad.set_shape([])
  label.set_shape([])
  texts.set_shape([None])
  return {"image": transforms.normalize(image), "bad": bad, "label": label, "texts": texts}


def _source_examples(data: dict, num_examples: int | None, size: int, label_key: str = "",
                     text_key: str = "") -> tf.data.Dataset:
  """This process's examples of a TFDS split, an image folder or any input-pipeline spec:
  {'image' float32 [S, S, 3], 'bad' bool, 'label' int32 (-1: none), 'texts' string [n]}."""
  if data["source"] == "tfds":
    split = data["split"] + (f"[:{int(num_examples)}]" if num_examples else "")
    source = sources.tfds_source(data["name"], split, image_key=data.get("image_key", "image"),
                                 label_key=label_key, text_key=text_key,
                                 data_dir=data.get("data_dir") or None)
  elif num_examples:
    raise ValueError(f"num_examples is not supported for source={data['source']!r}; use all of "
                     "it or a TFDS split such as 'validation[:10000]'")
  elif data["source"] == "image_folder":
    source = sources.image_folder_source(data["path"])
  else:
    source = sources.from_spec(data["spec"])

  def decode(packed):
    record = sources.unpack(bytes(packed))
    image, bad = _transformed(record.image, size)
    return (image, np.bool_(bad or bool(record.problem)), np.int32(record.label),
            np.array(record.texts, dtype=object).reshape(-1))

  records = source.eval_records(jax.process_index(), jax.process_count())
  return records.map(
      lambda packed: _finish_example(
          tf.numpy_function(decode, [packed], _EXAMPLE_TYPES, stateful=False), size),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def karpathy_split(path: str, image_dir: str, split: str) -> tuple[list[str], list[list[str]]]:
  """(image paths, captions per image) of one split of Karpathy's dataset_*.json."""
  with tf.io.gfile.GFile(path) as f:
    images = json.load(f)["images"]
  paths, captions = [], []
  for im in images:
    if im.get("split") == split:
      paths.append(os.path.join(image_dir, im.get("filepath", ""), im["filename"]))
      captions.append([s["raw"] for s in im["sentences"]])
  if not paths:
    raise ValueError(f"{path}: no image has split={split!r}")
  if not tf.io.gfile.exists(paths[0]):
    raise FileNotFoundError(f"{paths[0]} (from {path}) does not exist: is image_dir "
                            f"{image_dir!r} right?")
  return paths, captions


def _karpathy_examples(data: dict, num_examples: int | None, size: int) -> tf.data.Dataset:
  paths, captions = karpathy_split(data["path"], data["image_dir"], data.get("split", "test"))
  if num_examples:
    paths, captions = paths[:num_examples], captions[:num_examples]
  start, stop = common.host_slice(len(paths))
  local = captions[start:stop]
  texts = tf.RaggedTensor.from_row_lengths(
      tf.constant([t for c in local for t in c], tf.string), [len(c) for c in local])

  def decode(path):
    try:
      with tf.io.gfile.GFile(path.decode(), "rb") as f:
        data = f.read()
    except (OSError, tf.errors.OpError):  # a missing or unreadable file is a bad image
      data = b""
    image, bad = _transformed(data, size)
    return image, np.bool_(bad)

  def example(path, captions):
    image, bad = tf.numpy_function(decode, [path], [tf.uint8, tf.bool], stateful=False)
    return _finish_example((image, bad, tf.constant(-1, tf.int32), captions), size)

  ds = tf.data.Dataset.from_tensor_slices((paths[start:stop], texts))
  return ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _demo(config, split: str, num_examples: int, fields: tuple[str, ...]) -> tf.data.Dataset:
  """This process's examples of a demo split, rendered at the model's size (unbatched)."""
  size, seed = config.model.image_size, config.input.demo.seed
  start, stop = common.host_slice(num_examples)
  types = {"caption": tf.string, "long_caption": tf.string, "colour": tf.int32,
           "shape": tf.int32, "position": tf.int32}

  def render(indices):
    b = demo.batch(seed, split, indices, size)
    return (b["image"], *(b[f] for f in fields))

  def to_examples(indices):
    out = tf.numpy_function(render, [indices], [tf.uint8, *(types[f] for f in fields)],
                            stateful=False)
    out[0].set_shape([None, size, size, 3])
    ex = {"image": transforms.normalize(out[0]), "bad": tf.zeros([tf.shape(out[0])[0]], bool)}
    for f, value in zip(fields, out[1:]):
      value.set_shape([None])
      ex[f] = value
    return ex

  ds = tf.data.Dataset.range(start, stop).batch(64)
  return ds.map(to_examples, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()


def _batched(ds: tf.data.Dataset, local_batch: int) -> tf.data.Dataset:
  return ds.batch(local_batch).prefetch(2)
