"""Image-folder sources: `folder:PATH`, PATH/<class>/<image> (the ILSVRC val layout); the
class index is the position of <class> in sorted order. Files are read in order, in groups of
_FOLDER_CHUNK, each epoch a seeded permutation of all files (`position.py`).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from superclip_jax.data import core, position, records
from superclip_jax.data.spec import DEFAULT_TEMPLATES, Fields

FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_FOLDER_CHUNK = 4096  # files per position group of a folder source


class ImageFolderSource(core.Source):
  """PATH/<class>/<image>: class index = position of <class> in sorted order."""
  kind = "folder"

  def __init__(self, spec: str, path: str, fields: Fields):
    super().__init__(spec, fields)
    if not tf.io.gfile.isdir(path):
      raise ValueError(f"{spec}: image folder {path!r} does not exist")
    classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                     if tf.io.gfile.isdir(os.path.join(path, d.rstrip("/"))))
    if not classes:
      raise ValueError(f"{spec}: {path!r} has no class subfolders (expected PATH/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
      directory = os.path.join(path, name)
      for f in sorted(tf.io.gfile.listdir(directory)):
        if f.lower().endswith(FOLDER_EXTENSIONS):
          files.append(os.path.join(directory, f))
          labels.append(label)
    if not files:
      raise ValueError(f"{spec}: no images ({', '.join(FOLDER_EXTENSIONS)}) under {path!r}")
    self.classnames = tuple(classes)
    self.files = np.array(files, dtype=object)
    self.labels = np.array(labels, np.int64)
    self._captions = [[t.format(c).encode() for t in fields.label_templates] for c in classes]

  def _read_and_pack(self, path, label) -> bytes:
    label = int(label)
    image, problem = _read_file(path)
    return records.pack(records.Record(image, self._captions[label], [], label, bytes(path),
                                       problem))

  def _record(self, path_and_label):
    packed = tf.numpy_function(self._read_and_pack, list(path_and_label), tf.string,
                               stateful=False)
    packed.set_shape([])
    return packed

  item_name = "file"

  @property
  def num_items(self):
    return len(self.files)

  def _items_per_group(self, process_count, cycle_length):
    del process_count, cycle_length
    return _FOLDER_CHUNK

  def _progress(self, group, offset, process_count, cycle_length):
    del process_count, cycle_length  # files are read in order, one position each
    return (group * _FOLDER_CHUNK + offset,) * 2

  def record_epochs(self, groups, offsets, process_index, process_count, cycle_length,
                    origin=(0, 0)):
    """Each file's own pass: one group of _FOLDER_CHUNK files spans several passes over a
    smaller folder (`position.process_items` is the sequence read)."""
    del cycle_length
    j = np.asarray(groups, np.int64) * _FOLDER_CHUNK + np.asarray(offsets, np.int64)
    first = int(origin[0]) * self.num_items + int(origin[1]) + process_index
    return (first + j * process_count) // self.num_items

  def head_warning(self) -> str | None:
    if len(self.classnames) > 1:
      return None
    return (f"{self.spec} has one class ({self.classnames[0]!r}), so every caption holds the "
            "same words: each token's IDF is 0 and the class head's loss is exactly 0, it "
            "learns nothing. Add classes, use captioned data, or train model.mode='clip'")

  def train_records(self, *, seed, source_index, group, offset, process_index, process_count,
                    cycle_length, shuffle_buffer, origin=(0, 0)):
    del cycle_length, shuffle_buffer  # every epoch is a full permutation of the files
    num = len(self.files)
    first_group, first_offset = int(group), int(offset)
    first_item = int(origin[0]) * num + int(origin[1])

    def chunk(g):
      idx = position.process_items(num, seed, source_index, process_index, process_count,
                                   int(g) * _FOLDER_CHUNK, _FOLDER_CHUNK, first_item)
      return self.files[idx].astype(bytes), self.labels[idx]

    def open_chunk(g):
      paths, labels = tf.numpy_function(chunk, [g], [tf.string, tf.int64], stateful=False)
      files = tf.data.Dataset.from_tensor_slices(
          (tf.reshape(paths, [_FOLDER_CHUNK]), tf.reshape(labels, [_FOLDER_CHUNK])))
      return core.positioned(files, g, first_group, first_offset, self._record)

    return tf.data.Dataset.range(first_group, core.INT64_MAX).interleave(
        open_chunk, cycle_length=1, num_parallel_calls=1, deterministic=True)

  def eval_records(self, process_index=0, process_count=1):
    files = self.files[process_index::process_count].astype(bytes)
    labels = self.labels[process_index::process_count]
    return tf.data.Dataset.from_tensor_slices((files, labels)).map(
        lambda path, label: self._record((path, label)), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)


def _read_file(path) -> tuple[bytes, str]:
  """(the file's bytes, '') or, for a vanished or unreadable file, (b'', 'unreadable_file')."""
  try:
    with tf.io.gfile.GFile(path.decode(), "rb") as f:
      return f.read(), ""
  except Exception:  # noqa: BLE001  a bad record, never an exception
    return b"", "unreadable_file"


def image_folder_source(path: str, label_templates: Sequence[str] = DEFAULT_TEMPLATES
                        ) -> ImageFolderSource:
  """PATH/<class>/<image> (e.g. ILSVRC2012 val sorted into synset folders); `classnames` are
  the folder names in sorted order, the label their index."""
  return ImageFolderSource(f"folder:{path}", path,
                           Fields(label="label", label_templates=tuple(label_templates)))
