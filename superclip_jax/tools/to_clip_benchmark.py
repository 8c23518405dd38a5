"""Writes a labelled eval set in clip_benchmark's local webdataset layout, with the class names
and prompts of our zero-shot evaluator, so that LAION's `clip_benchmark eval` and ours score
the same images against the same prompts (docs/evaluation.md, "Cross-check with
clip_benchmark").

  python -m superclip_jax.tools.to_clip_benchmark --data=folder:/data/val --out=/data/cb/val
  python -m superclip_jax.tools.to_clip_benchmark --data=tfds:cifar10:test --classnames=cifar10 \
      --out=/data/cb/cifar10
  python -m superclip_jax.tools.clip_benchmark_eval eval --model=local-dir:EXPORT \
      --pretrained='' --dataset=wds/val --dataset_root='/data/cb/{dataset}' --no_amp \
      --num_workers=1 --output=val.json

--data is a labelled eval spec as the zeroshot eval takes it (folder:, tfds:,
wds:...?label=); --classnames and --templates mean what that eval's fields mean: a built-in
list name, or the flag repeated once per entry; by default the data's own class names and the
class list's default templates. Writes
  OUT/test/0.tar, 1.tar, ...  per image {key}.{jpg,png,webp}, {key}.cls (the label) and
                              {key}.txt (its class name, so that our wds: reader takes them)
  OUT/test/nshards.txt
  OUT/classnames.txt          one name per label, in label order
  OUT/zeroshot_classification_templates.txt
                              one template per line, '{}' written as '{c}' (clip_benchmark
                              fills them with template.format(c=name))
Images are copied byte for byte (formats clip_benchmark does not read, e.g. BMP, become PNG,
losslessly); an image that does not decode is reported and left out, where our evaluator
would keep it as a black image (`num_bad_images`).
"""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator, Sequence

from absl import app, flags
from PIL import Image

# PIL format -> the member extension clip_benchmark decodes (jpg, png, webp).
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


def labelled_images(spec: str) -> Iterator[tuple[bytes, int]]:
  """(encoded image, label) of every record of a labelled eval spec, in the source's order."""
  from superclip_jax.data import records, sources
  from superclip_jax.data.spec import Fields
  from superclip_jax.evaluators import eval_data
  data = eval_data.parse(spec, eval_data.LABELS)
  if data.kind == "demo":
    raise ValueError("--data=demo: write the demo's images to a folder first (folder:PATH)")
  # The zeroshot eval's fields (eval_data): shards name their label with ?label=.
  fields = Fields(label="label") if data.kind in ("folder", "tfds") else Fields(text="txt")
  source = sources.from_spec(data.spec, fields)
  for packed in source.eval_records().as_numpy_iterator():
    record = records.unpack(packed)
    yield record.image, record.label


def prompts_for(spec: str, classnames=None, templates=None) -> tuple[tuple[str, ...],
                                                                     tuple[str, ...]]:
  """(class names, templates) exactly as ZeroShotEvaluator resolves them for `spec`."""
  from superclip_jax.evaluators import eval_data, zeroshot
  data = eval_data.parse(spec, eval_data.LABELS)
  chosen = zeroshot.class_names(classnames, eval_data.class_list(data), data.spec)
  return zeroshot.resolve(chosen, templates)


def _image_member(data: bytes) -> tuple[bytes, str]:
  """Encoded image -> (bytes, extension) that clip_benchmark reads; raises if it won't decode."""
  image = Image.open(io.BytesIO(data))
  image.load()
  if image.format in _EXTENSIONS:
    return data, _EXTENSIONS[image.format]
  out = io.BytesIO()
  try:
    image.save(out, "PNG")
  except OSError:  # a mode PNG cannot hold (CMYK): RGB, as both readers would convert it
    out = io.BytesIO()
    image.convert("RGB").save(out, "PNG")
  return out.getvalue(), "png"


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mode = 0o444
  info.mtime = 0  # reproducible shards
  tar.addfile(info, io.BytesIO(data))


def write_layout(images, classnames: Sequence[str], templates: Sequence[str], out: str,
                 split: str = "test", shard_size: int = 10_000) -> dict:
  """Writes `images` ((encoded bytes, label) pairs) as clip_benchmark's wds layout under `out`.

  Returns {'num_images', 'num_skipped', 'num_shards'}. Labels must lie in [0, len(classnames)).
  """
  import tensorflow as tf
  if shard_size <= 0:
    raise ValueError(f"--shard_size must be positive, got {shard_size}")
  bad = [t for t in templates if t.count("{}") != 1 or "{c}" in t]
  if bad:
    raise ValueError(f"templates need exactly one '{{}}': {bad[:3]}")
  tf.io.gfile.makedirs(os.path.join(out, split))
  with tf.io.gfile.GFile(os.path.join(out, "classnames.txt"), "w") as f:
    f.write("".join(f"{name}\n" for name in classnames))
  with tf.io.gfile.GFile(os.path.join(out, "zeroshot_classification_templates.txt"), "w") as f:
    f.write("".join(t.replace("{}", "{c}") + "\n" for t in templates))
  num_images = num_skipped = num_shards = 0
  tar = f = None
  try:
    for index, (data, label) in enumerate(images):
      if not 0 <= label < len(classnames):
        raise ValueError(f"image {index} has label {label}, outside the {len(classnames)} "
                         "classes")
      try:
        member, ext = _image_member(bytes(data))
      except Exception as e:  # noqa: BLE001  PIL raises many types on bad data
        print(f"skipping image {index} (label {label}): it does not decode ({e})")
        num_skipped += 1
        continue
      if num_images % shard_size == 0:
        if tar is not None:
          tar.close()
          f.close()
        f = tf.io.gfile.GFile(os.path.join(out, split, f"{num_shards}.tar"), "wb")
        tar = tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT)
        num_shards += 1
      key = f"s{num_images:07d}"  # clip_benchmark_export_wds's keys
      _add(tar, f"{key}.{ext}", member)
      _add(tar, f"{key}.cls", str(int(label)).encode())
      _add(tar, f"{key}.txt", classnames[label].encode("utf-8"))
      num_images += 1
  finally:
    if tar is not None:
      tar.close()
      f.close()
  if not num_images:
    raise ValueError("no image could be written (see the messages above)")
  with tf.io.gfile.GFile(os.path.join(out, split, "nshards.txt"), "w") as f:
    f.write(f"{num_shards}\n")
  return {"num_images": num_images, "num_skipped": num_skipped, "num_shards": num_shards}


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined only when run as a script: importing this module for
  `write_layout` must not claim flag names such as --out in the importer's process)."""
  flags.DEFINE_string("data", None, "Labelled eval data: folder:PATH, tfds:NAME:SPLIT or "
                      "wds:PATTERN?label=FIELD.")
  flags.DEFINE_string("out", None, "Dataset folder to write (clip_benchmark's --dataset_root).")
  flags.DEFINE_multi_string("classnames", None, "A built-in list (imagenet, cifar10, cifar100), "
                            "or once per class in label order (default: the data's own).")
  flags.DEFINE_multi_string("templates", None, "A built-in list (openai_imagenet, cifar, plain), "
                            "or once per template with one '{}' (default: the class list's).")
  flags.DEFINE_string("split", "test", "Split folder name (clip_benchmark's --split).")
  flags.DEFINE_integer("shard_size", 10_000, "Images per shard.")


def _one_or_list(values):
  """A repeated flag: None, one built-in name, or a list."""
  if not values:
    return None
  return values[0] if len(values) == 1 and "{}" not in values[0] else list(values)


def main(argv):
  del argv
  if not FLAGS.data or not FLAGS.out:
    raise app.UsageError("--data and --out are required")
  classnames = _one_or_list(FLAGS.classnames)
  if isinstance(classnames, str):
    from superclip_jax.evaluators import zeroshot
    if classnames not in zeroshot.CLASSNAMES:  # a single class is still a list
      classnames = [classnames]
  classnames, templates = prompts_for(FLAGS.data, classnames, _one_or_list(FLAGS.templates))
  counts = write_layout(labelled_images(FLAGS.data), classnames, templates, FLAGS.out,
                        FLAGS.split, FLAGS.shard_size)
  root, name = os.path.split(FLAGS.out.rstrip("/"))
  # webdataset fails ("No samples found") when a loader worker gets no shard.
  workers = min(4, counts["num_shards"])
  print(f"wrote {counts['num_images']} images in {counts['num_shards']} shard(s) "
        f"({counts['num_skipped']} skipped), {len(classnames)} classes, {len(templates)} "
        f"templates to {FLAGS.out}; clip_benchmark eval: --dataset=wds/{name} "
        f"--dataset_root='{os.path.join(root, '{dataset}')}' --num_workers={workers}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
