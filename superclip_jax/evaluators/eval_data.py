"""Eval data: this process's share of a labelled image set or an image-text set, as tf.data.

An eval names its data (`data`, `train_data`, `test_data`) with a spec string, as training
does (docs/data.md), plus two kinds only evaluations read:

  'tfds:NAME:SPLIT'      any TFDS dataset (imagenet2012, cifar10, coco_captions, ...); reads
                         the features 'image' and 'label' (classification) or 'captions/text'
                         (retrieval) unless ?image= / ?label= / ?text= say otherwise; ?data_dir=
  'folder:PATH'          one sub-folder per class, classes in sorted order: the ILSVRC val
                         layout of the official code (torchvision `ImageFolder`); labels only
  'wds:PATTERN', 'tfrecord:PATTERN'
                         shards with captions ('txt' unless ?text=); classification needs
                         ?label= (e.g. 'wds:/data/val/{000..009}.tar?label=cls')
  'demo' or 'demo:SPLIT' the built-in demo's splits (default: 'zeroshot' for labels,
                         'retrieval' for captions)
  'karpathy:JSON?image_dir=DIR(&split=test)'
                         Karpathy's dataset_{coco,flickr30k}.json: the COCO 5k and Flickr30k
                         1k test splits; captions only

`parse` checks a string when the evaluator is built, against what the evaluator needs
(LABELS or CAPTIONS), so a wrong name fails before training starts.

TFDS datasets, image folders and shards are read by the input pipeline's sources
(`Source.eval_records`), which give each process its own part of the records; the demo and
Karpathy lists are split here into contiguous shares (`common.host_slice`).
Images are decoded and transformed on the host CPU by the input pipeline's eval transform
(`data.transforms.eval_record`: PIL, shortest side to the model's image size, bicubic, centre
crop — OpenCLIP's eval preprocessing pixel for pixel), then CLIP-normalised, and batched to
the local batch size (the last batch may be smaller; `common.BatchedFn` pads it).

Every example has a `bad` flag: an image that cannot be read or decoded stays in the
evaluation as a black image, so the number of examples never changes silently, and the
evaluators report how many there were (`num_bad_images`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import urllib.parse
from collections.abc import Mapping

import jax
import numpy as np
import tensorflow as tf

from superclip_jax import tokenizer
from superclip_jax.data import demo, records, sources, transforms
from superclip_jax.data import spec as data_spec
from superclip_jax.evaluators import common

# What an evaluator needs from its data.
LABELS, CAPTIONS = "labels", "captions"
_DEMO_SPLITS = {LABELS: "zeroshot", CAPTIONS: "retrieval"}  # 'demo' without a split
_KARPATHY_OPTIONS = ("image_dir", "split")
_EXAMPLES = ("'tfds:imagenet2012:validation', 'folder:/data/imagenet/val', "
             "'karpathy:/data/dataset_flickr30k.json?image_dir=/data/flickr30k-images' or 'demo'")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A parsed eval data string: `kind` is 'demo', 'karpathy' or a data-source kind (tfds,
  folder, wds, tfrecord); `location` the demo split, Karpathy's JSON or the source's location;
  `options` what follows '?'."""
  spec: str
  kind: str
  location: str
  options: dict


# The dict form that configs written before spec strings hold (a workdir's config.json):
# source -> (spec kind, the field giving the location, {old field: spec option}).
_LEGACY = {"demo": ("demo", "split", {}),
           "tfds": ("tfds", None, {"data_dir": "data_dir", "image_key": "image",
                                   "label_key": "label", "captions_key": "text"}),
           "image_folder": ("folder", "path", {}),
           "karpathy_json": ("karpathy", "path", {"image_dir": "image_dir", "split": "split"}),
           "spec": (None, "spec", {})}


def legacy_spec(data) -> str:
  """The spec string of an old-style dict(source=..., ...) eval data field."""
  data = dict(data)
  source = data.pop("source", None)
  if source not in _LEGACY:
    raise ValueError(f"eval data {data!r}: name it with a spec string, e.g. {_EXAMPLES} "
                     "(docs/evaluation.md)")
  kind, location_field, option_names = _LEGACY[source]
  if kind is None:
    return data.pop("spec")
  location = (f"{data.pop('name', '')}:{data.pop('split', '')}" if kind == "tfds"
              else data.pop(location_field, None) or "")
  options = {option_names[k]: v for k, v in data.items() if k in option_names and v}
  unknown = set(data) - set(option_names)
  if unknown:
    raise ValueError(f"eval data dict(source={source!r}): unknown field(s) {sorted(unknown)}")
  spec = f"{kind}:{location}" if location else kind
  return spec + ("?" + urllib.parse.urlencode(options, safe="/{}.,*") if options else "")


def parse(data: str, needs: str) -> DataSpec:
  """An eval's data string, checked against what the evaluator `needs` (LABELS or CAPTIONS).

  The dict form of older configs is read as the spec string it stands for (`legacy_spec`).
  """
  if isinstance(data, Mapping) or hasattr(data, "to_dict"):
    data = legacy_spec(data.to_dict() if hasattr(data, "to_dict") else data)
  if not isinstance(data, str):
    raise ValueError(f"eval data {data!r}: name it with a spec string, e.g. {_EXAMPLES} "
                     "(docs/evaluation.md)")
  spec = data.strip()
  kind, _, rest = spec.partition(":")
  location, _, query = rest.partition("?")
  if kind == "demo":
    location = location or _DEMO_SPLITS[needs]
    if location not in demo.SPLITS or query:
      raise ValueError(f"eval data {spec!r}: write 'demo' or 'demo:SPLIT' with a split of "
                       f"{tuple(demo.SPLITS)}")
    options = {}
  elif kind == "karpathy":
    options = dict(urllib.parse.parse_qsl(query))
    if not location or not options.get("image_dir") or set(options) - set(_KARPATHY_OPTIONS):
      raise ValueError(f"eval data {spec!r}: write 'karpathy:JSON?image_dir=DIR', optionally "
                       "with '&split=SPLIT' (default: test)")
    options.setdefault("split", "test")
  else:
    kind, location, options = data_spec.parse_spec(spec)
    if kind == "tfds" and location.split("[")[0].rfind(":") <= 0:  # no NAME:SPLIT
      raise ValueError(f"eval data {spec!r}: write TFDS data as 'tfds:NAME:SPLIT', e.g. "
                       "'tfds:imagenet2012:validation'")
  if needs == LABELS and kind == "karpathy":
    raise ValueError(f"eval data {spec!r} has no class labels: use 'tfds:…', 'folder:…', "
                     "shards with ?label= or 'demo'")
  if needs == LABELS and kind in ("wds", "tfrecord") and not options.get("label"):
    raise ValueError(f"eval data {spec!r} names no label field: add ?label=FIELD (e.g. "
                     "?label=cls)")
  if needs == CAPTIONS and kind == "folder":
    raise ValueError(f"eval data {spec!r}: an image folder has no captions: use 'tfds:…', "
                     "'karpathy:…', 'wds:…', 'tfrecord:…' or 'demo'")
  return DataSpec(spec, kind, location, options)


def class_list(data: DataSpec) -> tuple[str, ...] | None:
  """The class names the data itself carries, in label order: a folder's sub-folders (sorted),
  a TFDS ClassLabel's names; None for shards and the demo (their labels are bare numbers)."""
  if data.kind not in ("folder", "tfds"):
    return None
  return sources.from_spec(data.spec, _fields(data, LABELS)).classnames


def _fields(data: DataSpec, needs: str) -> data_spec.Fields:
  """The record fields an eval reads unless the spec's options (?image=, ...) say otherwise."""
  if data.kind == "tfds" and needs == CAPTIONS:
    return data_spec.Fields(text="captions/text")
  if data.kind in ("tfds", "folder"):
    return data_spec.Fields(label="label")
  return data_spec.Fields(text="txt")


def classification_data(data: DataSpec, config, local_batch: int,
                        num_examples: int | None = None) -> tf.data.Dataset:
  """This process's batches: image float32 [b, S, S, 3], bad bool [b], label fields int32 [b].

  `data` comes from `parse(..., LABELS)`. Label fields: 'label', or for the demo one per
  attribute ('colour', 'shape', 'position'). `num_examples` keeps the first n (tfds; the demo
  renders n, default 512).
  """
  if data.kind == "demo":
    ds = _demo(config, data.location, num_examples or 512,
               ("colour", "shape", "position"))
    return _batched(ds, local_batch)
  ds = _source_examples(data, LABELS, num_examples, config.model.image_size)
  ds = ds.map(lambda ex: {"image": ex["image"], "bad": ex["bad"], "label": ex["label"]})
  return _batched(ds, local_batch)


def image_text_data(data: DataSpec, config, local_batch: int, max_captions: int,
                    num_examples: int | None = None) -> tf.data.Dataset:
  """This process's batches: image float32 [b, S, S, 3], bad bool [b], tokens int32
  [b, K, context], caption_mask bool [b, K] (K = max_captions; the first K captions of each
  image are kept, fewer are padded and masked). `data` comes from `parse(..., CAPTIONS)`."""
  size, context = config.model.image_size, config.model.context_length
  if data.kind == "demo":
    ds = _demo(config, data.location, num_examples or 512,
               ("caption", "long_caption"))
    ds = ds.map(lambda ex: {"image": ex["image"], "bad": ex["bad"],
                            "captions": tf.stack([ex["caption"], ex["long_caption"]])})
  else:
    if data.kind == "karpathy":
      ds = _karpathy_examples(data, num_examples, size)
    else:
      ds = _source_examples(data, CAPTIONS, num_examples, size)
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


def _source_examples(data: DataSpec, needs: str, num_examples: int | None,
                     size: int) -> tf.data.Dataset:
  """This process's examples of a TFDS split, an image folder or shards:
  {'image' float32 [S, S, 3], 'bad' bool, 'label' int32 (-1: none), 'texts' string [n]}."""
  spec = data.spec
  if num_examples:
    if data.kind != "tfds":
      raise ValueError(f"num_examples is not supported for eval data {spec!r}; use all of it "
                       "or a TFDS split such as 'tfds:imagenet2012:validation[:10000]'")
    location, _, query = spec.partition("?")
    spec = f"{location}[:{int(num_examples)}]" + (f"?{query}" if query else "")
  source = sources.from_spec(spec, _fields(data, needs))

  def decode(packed):
    record = records.unpack(bytes(packed))
    image, bad = _transformed(record.image, size)
    return (image, np.bool_(bad or bool(record.problem)), np.int32(record.label),
            np.array(record.texts, dtype=object).reshape(-1))

  packed_records = source.eval_records(jax.process_index(), jax.process_count())
  return packed_records.map(
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


def _karpathy_examples(data: DataSpec, num_examples: int | None, size: int) -> tf.data.Dataset:
  paths, captions = karpathy_split(data.location, data.options["image_dir"],
                                   data.options["split"])
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
  start, stop = common.host_slice(num_examples)
  return demo.eval_examples(config, split, start, stop, fields)


def _batched(ds: tf.data.Dataset, local_batch: int) -> tf.data.Dataset:
  return ds.batch(local_batch).prefetch(2)
