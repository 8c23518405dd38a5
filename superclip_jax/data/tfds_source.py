"""TFDS sources: `tfds:NAME[:VERSION]:SPLIT`. Images are passed on encoded
(tfds.decode.SkipDecoding) and decoded by the pipeline; each process reads its own
`tfds.even_splits` part, one epoch pass of it per position group.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from superclip_jax.data import core, position, records
from superclip_jax.data.spec import DEFAULT_TEMPLATES, Fields


class TfdsSource(core.Source):
  """A TFDS dataset; images are passed on encoded (tfds.decode.SkipDecoding) and decoded by us."""
  kind = "tfds"

  def __init__(self, spec: str, name: str, split: str, fields: Fields, data_dir: str | None):
    import tensorflow_datasets as tfds
    super().__init__(spec, fields)
    self.name, self.split = name, split
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001  (tfds raises DatasetNotFoundError and others)
      raise ValueError(f"{spec}: TFDS has no dataset {name!r} ({e})") from e
    features = self.builder.info.features
    image = fields.image or "image"
    image_feature = _tfds_feature(features, image, spec, "image")
    if not isinstance(image_feature, tfds.features.Image):
      raise ValueError(f"{spec}: feature {image!r} is a {type(image_feature).__name__}, "
                       "not an Image; set config.input.image_key")
    label = fields.label
    if not label and not fields.text and "label" in features:
      label = "label"
    if label:
      label_feature = _tfds_feature(features, label, spec, "label")
      if isinstance(label_feature, tfds.features.ClassLabel):
        self.classnames = tuple(label_feature.names)
    if fields.text:
      _tfds_feature(features, fields.text, spec, "text")
    if fields.long_text:
      _tfds_feature(features, fields.long_text, spec, "long_text")
    self.fields = dataclasses.replace(fields, image=image, label=label)
    self._decoders = _skip_decoding(image)
    self._captions = (_labels_as_captions(self.classnames, fields.label_templates)
                      if self.classnames and not fields.text else None)

  def _split(self, process_index, process_count):
    if process_count == 1:
      return self.split
    import tensorflow_datasets as tfds
    return tfds.even_splits(self.split, process_count)[process_index]

  def _dataset(self, split):
    try:
      return self.builder.as_dataset(split=split, shuffle_files=False, decoders=self._decoders)
    except Exception as e:  # noqa: BLE001  (not prepared, unknown split, ...)
      raise ValueError(f"{self.spec}: cannot read split {split!r} of {self.name!r}: {e}") from e

  def _record(self, example):
    f = self.fields
    label = (tf.cast(tf.reshape(_get(example, f.label), []), tf.int64) if f.label
             else tf.constant(-1, tf.int64))
    if f.text:
      texts = tf.reshape(_get(example, f.text), [-1])
    elif self._captions is not None:
      texts = tf.gather(self._captions, tf.maximum(label, 0))
    else:
      texts = tf.zeros([0], tf.string)
    long_texts = (tf.reshape(_get(example, f.long_text), [-1]) if f.long_text
                  else tf.zeros([0], tf.string))
    return records.tf_pack(_get(example, f.image), tf.cast(texts, tf.string),
                           tf.cast(long_texts, tf.string), label,
                           tf.constant(self.name, tf.string))

  def restart_positions(self, rows, origin, new_count, cycle_length):
    """TFDS splits the data per process (tfds.even_splits), so there is no global item order:
    every new process starts at the beginning of the least advanced old process's epoch
    (position group). `repeated` counts the (process, epoch) passes an old process had begun
    from there on."""
    del cycle_length
    return position.restart_at_least_advanced_group(rows, origin, new_count)

  item_name = "epoch pass"

  def record_epochs(self, groups, offsets, process_index, process_count, cycle_length,
                    origin=(0, 0)):
    del offsets, process_index, process_count, cycle_length, origin
    return np.asarray(groups, np.int64)  # a group is one pass over this process's split

  def summary(self):
    try:
      return f"{self.spec}: {self.builder.info.splits[self.split].num_examples} examples"
    except Exception:  # noqa: BLE001  (split names tfds cannot size, e.g. before preparing)
      return self.spec

  def train_records(self, *, seed, source_index, group, offset, process_index, process_count,
                    cycle_length, shuffle_buffer, origin=(0, 0)):
    del cycle_length, origin  # TFDS interleaves its own files; restarts move the group only
    if not self.fields.text and self._captions is None:
      raise ValueError(f"{self.spec}: training needs captions: set config.input.text_key (or "
                       "?text=) to a text feature, or label_key to a ClassLabel feature")
    base = self._dataset(self._split(process_index, process_count))
    base_seed = position.stream_seed(seed, source_index, process_index)
    first_group, first_offset = int(group), int(offset)

    def epoch(g):  # a position group of a TFDS source is one epoch of this process's split
      stream = base
      if shuffle_buffer > 1:
        stream = stream.shuffle(shuffle_buffer, seed=g * 1_000_003 + base_seed,
                                reshuffle_each_iteration=False)
      return core.positioned(stream, g, first_group, first_offset, self._record)

    return tf.data.Dataset.range(first_group, core.INT64_MAX).interleave(
        epoch, cycle_length=1, num_parallel_calls=1, deterministic=True)

  def eval_records(self, process_index=0, process_count=1):
    return self._dataset(self._split(process_index, process_count)).map(
        self._record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _tfds_feature(features, path: str, spec: str, role: str):
  node = features
  for part in path.split("/"):
    inner = getattr(node, "feature", None)  # tfds Sequence wraps a feature (dict)
    if inner is not None and not hasattr(node, "keys"):
      node = inner
    if not hasattr(node, "keys") or part not in node.keys():
      available = sorted(features.keys())
      raise ValueError(f"{spec}: the dataset has no {role} feature {path!r}; top-level "
                       f"features: {available} (set config.input.{role}_key or ?{role}=)")
    node = node[part]
  return node


def _get(example, path: str):
  for part in path.split("/"):
    example = example[part]
  return example


def _skip_decoding(image_path: str):
  import tensorflow_datasets as tfds
  decoders: dict = {}
  node = decoders
  parts = image_path.split("/")
  for part in parts[:-1]:
    node = node.setdefault(part, {})
  node[parts[-1]] = tfds.decode.SkipDecoding()
  return decoders


def _labels_as_captions(classnames: Sequence[str], templates: Sequence[str]) -> tf.Tensor:
  """[num_classes, num_templates] captions: each template filled with each class name."""
  return tf.constant([[t.format(c) for t in templates] for c in classnames], tf.string)


def from_location(spec: str, location: str, fields: Fields, data_dir: str | None) -> TfdsSource:
  """The source of `spec` = 'tfds:LOCATION?...' (for `sources.from_spec`)."""
  name, split = _split_tfds_location(location, spec)
  return TfdsSource(spec, name, split, fields, data_dir)


def _split_tfds_location(location: str, spec: str) -> tuple[str, str]:
  """'name[:version]:split' -> (name, split); the split may hold ':' inside [...]."""
  bracket = location.find("[")
  head = location if bracket < 0 else location[:bracket]
  colon = head.rfind(":")
  if colon <= 0:
    raise ValueError(f"data spec {spec!r}: write TFDS sources as 'tfds:NAME:SPLIT', e.g. "
                     "'tfds:coco_captions:train'")
  return location[:colon], location[colon + 1:]


def tfds_source(name: str, split: str, image_key: str = "image", text_key: str = "",
                label_key: str = "", long_text_key: str = "", data_dir: str | None = None,
                label_templates: Sequence[str] = DEFAULT_TEMPLATES) -> TfdsSource:
  """A TFDS dataset split, e.g. tfds_source('imagenet2012', 'validation', label_key='label')
  or tfds_source('coco_captions', 'val', text_key='captions/text'). `classnames` holds the
  ClassLabel names when there is a label."""
  return TfdsSource(f"tfds:{name}:{split}", name, split,
                    Fields(image_key, text_key, long_text_key, label_key,
                           tuple(label_templates)), data_dir)
