"""Writes webdataset tar shards (what img2dataset makes) from local images, without img2dataset.

  # an image folder: captions from sidecar files (photo.jpg + photo.txt), else from the class
  # subfolder's name through --template ('n01440764/x.JPEG' -> 'a photo of a n01440764.')
  python -m superclip_jax.tools.make_shards --input=/data/images --output=/data/shards

  # a CSV/TSV or JSONL table: an image path column and a caption column (paths relative to
  # the table's folder unless absolute); an optional long caption goes to json 'long_caption'
  python -m superclip_jax.tools.make_shards --input=captions.csv --output=gs://b/shards \
      --image_column=filepath --caption_column=title --long_caption_column=recap

Samples are shuffled across shards (--seed, default 0; the same seed gives the same shards)
so that every shard mixes the classes of a class-sorted folder: a reader interleaves only a few
shards at a time (config.input.cycle_length). --noshuffle keeps the input order.
Images that do not decode are reported and skipped. Each sample is `{key}.jpg|png|webp` +
`{key}.txt` + `{key}.json` ({"key", "caption", "captions", "source", and
"label"/"class"/"long_caption" when known}); with class folders also `{key}.cls` (the class
index). A JSONL caption may be a list of strings: several captions of one image, all in json
"captions" (the first in `.txt`), and the printed spec then reads them (`?text=json/captions`).
A caption that is null, a number, a boolean, an object or an empty list is no caption: its
row is reported and skipped (it used to train as the text 'None' or '42').
Keys are img2dataset-style: shard number then index in the shard ('000030012'). Shards are
`OUTPUT/00000.tar, 00001.tar, ...` (local or gs://); the command prints the spec to put in
config.input.data. Images are copied byte for byte unless --max_size re-encodes larger ones
(JPEG, quality 95, shortest side down to --max_size) or they are in another format (-> JPEG).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import tarfile
from typing import Iterable, Iterator, Sequence

from absl import app, flags

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_KEEP_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclasses.dataclass
class Sample:
  image_path: str
  caption: str
  long_caption: str | None = None
  label: int | None = None
  classname: str | None = None
  more_captions: tuple[str, ...] = ()  # a table cell's list: json 'captions' holds them all


def _table_captions(value) -> tuple[tuple[str, ...], str]:
  """A table cell as (captions, '') — a string is one caption, a non-empty list of strings
  several — or ((), why it is none): JSON null, numbers, booleans, objects and lists of
  anything else are not captions (their text, 'None' or '42', would train as one)."""
  if isinstance(value, str):
    return (value,), ""
  if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
    return tuple(value), ""
  def kind(v):
    return ("null" if v is None else "a boolean" if isinstance(v, bool) else
            "a number" if isinstance(v, (int, float)) else "an object" if isinstance(v, dict)
            else "a list")
  kind = ("an empty list" if value == [] else
          f"a list holding {kind(next(v for v in value if not isinstance(v, str)))}"
          if isinstance(value, list) else kind(value))
  return (), f"is {kind} ({json.dumps(value)[:60]}), not a caption: a string or a list of strings"


def _read_text(path: str) -> str:
  import tensorflow as tf
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read().decode("utf-8", "replace").strip()


def samples_from_folder(root: str, template: str = "a photo of a {}.") -> Iterator[Sample]:
  """Every image under `root` (sorted). Caption: the sidecar `<stem>.txt` if there is one,
  else `template` with the class (first-level subfolder) name; images with neither are
  reported and skipped."""
  import tensorflow as tf
  if not tf.io.gfile.isdir(root):
    raise ValueError(f"--input={root!r} is not a folder, .csv, .tsv or .jsonl file")
  classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root)
                   if tf.io.gfile.isdir(os.path.join(root, d.rstrip("/"))))
  class_index = {name: i for i, name in enumerate(classes)}
  found = False
  for directory, _, files in sorted(tf.io.gfile.walk(root)):
    names = set(files)
    for name in sorted(files):
      stem, suffix = os.path.splitext(name)
      if suffix.lower() not in IMAGE_SUFFIXES:
        continue
      found = True
      path = os.path.join(directory, name)
      rel = os.path.relpath(directory, root)
      classname = rel.split(os.sep)[0] if rel != "." else None
      if stem + ".txt" in names:
        caption = _read_text(os.path.join(directory, stem + ".txt"))
      elif classname is not None:
        caption = template.format(classname.replace("_", " "))
      else:
        print(f"skipping {path}: no {stem}.txt caption and no class folder")
        continue
      yield Sample(path, caption, label=class_index.get(classname), classname=classname)
  if not found:
    raise ValueError(f"--input={root!r}: no images ({', '.join(IMAGE_SUFFIXES)}) found")


def samples_from_table(path: str, image_column: str = "image", caption_column: str = "caption",
                       long_caption_column: str = "") -> Iterator[Sample]:
  """Rows of a .csv / .tsv (header row) or .jsonl file."""
  import tensorflow as tf
  if not tf.io.gfile.exists(path):
    raise ValueError(f"--input={path!r} does not exist")
  base = os.path.dirname(path)
  with tf.io.gfile.GFile(path, "r") as f:
    if path.endswith(".jsonl"):
      rows: Iterable[dict] = (json.loads(line) for line in f if line.strip())
    else:
      rows = csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ",")
    for number, row in enumerate(rows, start=1):
      for column in (image_column, caption_column) + ((long_caption_column,)
                                                      if long_caption_column else ()):
        if column not in row:
          raise ValueError(f"{path}: row {number} has no column {column!r}; columns: "
                           f"{sorted(row)} (use --image_column / --caption_column)")
      captions, why = _table_captions(row[caption_column])
      long_caption = row[long_caption_column] if long_caption_column else None
      if not why and long_caption is not None and not isinstance(long_caption, str):
        why = _table_captions(long_caption)[1] or "is a list: one long caption per image"
        caption_column = long_caption_column
      if why:
        print(f"skipping {path} row {number}: column {caption_column!r} {why}")
        continue
      image = str(row[image_column])
      if not (os.path.isabs(image) or "://" in image):
        image = os.path.join(base, image)
      yield Sample(image, captions[0], long_caption, more_captions=captions[1:])


def _image_bytes(path: str, max_size: int) -> tuple[bytes, str]:
  """(data, extension) for the shard: the file's bytes, or a JPEG re-encoding."""
  import tensorflow as tf
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  ext = _KEEP_FORMATS.get(os.path.splitext(path)[1].lower())
  from PIL import Image
  from superclip_jax.data import transforms
  image = Image.open(io.BytesIO(data))
  image.load()  # a file that does not decode is reported, not written
  if ext is None or (max_size and min(image.size) > max_size):
    image = transforms.to_8bit(image)  # re-encoded: 16-bit or float grey read as training does
  if max_size and min(image.size) > max_size:
    scale = max_size / min(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
  elif ext is not None:
    return data, ext
  out = io.BytesIO()
  image.convert("RGB").save(out, "JPEG", quality=95)
  return out.getvalue(), "jpg"


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mode = 0o444
  info.mtime = 0  # reproducible shards
  tar.addfile(info, io.BytesIO(data))


def shuffled(samples: Iterable[Sample], seed: int) -> list[Sample]:
  """`samples` in an order drawn from `seed` alone (the same seed, the same order)."""
  samples = list(samples)  # paths and captions only: millions fit in memory
  random.Random(seed).shuffle(samples)
  return samples


def write_shards(samples: Iterable[Sample], output: str, shard_size: int = 10_000,
                 max_size: int = 0, seed: int | None = 0, stats: dict | None = None
                 ) -> list[str]:
  """Writes OUTPUT/00000.tar, ... with `shard_size` samples each; returns the shard paths.
  seed: shuffle the samples across shards with it (`shuffled`); None keeps their order.
  Unreadable images are reported and skipped. stats, if given, gets 'several_captions': the
  samples written with more than one caption."""
  import tensorflow as tf
  if shard_size <= 0:
    raise ValueError(f"--shard_size must be positive, got {shard_size}")
  if seed is not None:
    samples = shuffled(samples, seed)
  tf.io.gfile.makedirs(output)
  digits = len(str(shard_size - 1))
  paths: list[str] = []
  tar = f = None
  index = several = 0
  try:
    for sample in samples:
      try:
        data, ext = _image_bytes(sample.image_path, max_size)
      except Exception as e:  # noqa: BLE001  a broken source image is reported, not fatal
        print(f"skipping {sample.image_path}: {e}")
        continue
      if tar is None or index == shard_size:
        if tar is not None:
          tar.close()
          f.close()
        paths.append(os.path.join(output, f"{len(paths):05d}.tar"))
        f = tf.io.gfile.GFile(paths[-1], "wb")
        tar = tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT)
        index = 0
      key = f"{len(paths) - 1:05d}{index:0{digits}d}"
      # Every sample lists its captions, so `?text=json/captions` reads all of them.
      meta = {"key": key, "caption": sample.caption,
              "captions": [sample.caption, *sample.more_captions], "source": sample.image_path}
      several += bool(sample.more_captions)
      if sample.long_caption is not None:
        meta["long_caption"] = sample.long_caption
      if sample.label is not None:
        meta["label"] = sample.label
        meta["class"] = sample.classname
      _add(tar, f"{key}.{ext}", data)
      _add(tar, f"{key}.txt", sample.caption.encode("utf-8"))
      _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
      if sample.label is not None:
        _add(tar, f"{key}.cls", str(sample.label).encode())
      index += 1
  finally:
    if tar is not None:
      tar.close()
      f.close()
  if not paths:
    raise ValueError("no sample could be written (see the messages above)")
  if stats is not None:
    stats["several_captions"] = several
  return paths


def shard_spec(paths: Sequence[str], several_captions: bool = False) -> str:
  """The brace pattern naming shards written by `write_shards` (for config.input.data);
  several_captions: read json 'captions' (every sample has it; one of them per example)
  instead of the first caption alone (`.txt`)."""
  directory = os.path.dirname(paths[0])
  last = len(paths) - 1
  return (f"wds:{directory}/{{{0:05d}..{last:05d}}}.tar"
          + ("?text=json/captions" if several_captions else ""))


FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "An image folder, or a .csv / .tsv / .jsonl table.")
flags.DEFINE_string("output", None, "Folder (local or gs://) for the .tar shards.")
flags.DEFINE_integer("shard_size", 10_000, "Samples per shard.")
flags.DEFINE_integer("max_size", 0, "Re-encode images whose shortest side is larger (0: copy).")
flags.DEFINE_string("template", "a photo of a {}.", "Caption from a class folder's name.")
flags.DEFINE_string("image_column", "image", "Table column with the image path.")
flags.DEFINE_string("caption_column", "caption", "Table column with the caption.")
flags.DEFINE_string("long_caption_column", "", "Table column with a long caption (optional).")
flags.DEFINE_integer("seed", 0, "Seed of the shuffle across shards.")
flags.DEFINE_bool("shuffle", True, "Shuffle samples across shards (--noshuffle: input order).")


def main(argv):
  del argv
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError("--input and --output are required")
  if FLAGS.input.endswith((".csv", ".tsv", ".jsonl")):
    samples = samples_from_table(FLAGS.input, FLAGS.image_column, FLAGS.caption_column,
                                 FLAGS.long_caption_column)
  else:
    samples = samples_from_folder(FLAGS.input, FLAGS.template)
  stats = {}
  paths = write_shards(samples, FLAGS.output, FLAGS.shard_size, FLAGS.max_size,
                       FLAGS.seed if FLAGS.shuffle else None, stats)
  spec = shard_spec(paths, stats["several_captions"] > 0)
  print(f"wrote {len(paths)} shard(s); config.input.data = {spec!r}")


if __name__ == "__main__":
  app.run(main)
