"""Zero-shot probabilities and class-head tags for images, from a trained workdir.

  python -m superclip_jax.predict --workdir=DIR --image=cat.jpg --labels="a cat,a dog"
  python -m superclip_jax.predict --workdir=DIR --image=a.jpg,b.png --top_k=5

For each image: the probability of each label (softmax over the labels of the scaled cosine
similarities; each label's own sigmoid for SigLIP runs) and the class head's top-k vocabulary
tokens with their probabilities. Models without a text tower print only tags, models without
a head only the labels.
"""
from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
from absl import app, flags, logging

from superclip_jax import cli, fs, models
from superclip_jax.data import transforms


def read_image(path: str):
  """An image file decoded by PIL, as OpenCLIP reads it (any format PIL knows)."""
  if not fs.exists(path):
    raise FileNotFoundError(f"--image {path!r} does not exist")
  return transforms.decode(fs.read_bytes(path))


def predict(model, paths: Sequence[str], labels: Sequence[str] = (),
            templates: Sequence[str] = ("{}",), top_k: int = 10) -> str:
  """The report `main` prints, for an `inference.Model`. An image that cannot be read or
  decoded is reported in its place ("  error: ...") and the others are still predicted."""
  return predict_and_count(model, paths, labels, templates, top_k)[0]


def predict_and_count(model, paths: Sequence[str], labels: Sequence[str] = (),
                      templates: Sequence[str] = ("{}",), top_k: int = 10) -> tuple[str, int]:
  """(`predict`'s report, how many images could not be read)."""
  images, errors = [], {}
  for path in paths:
    try:
      images.append(model.preprocess(read_image(path)))
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds
      errors[path] = f"{type(e).__name__}: {e}"
  good = [p for p in paths if p not in errors]
  probs = tags = None
  if good:
    images = np.stack(images)
    probs = (model.zero_shot(images, labels, templates)
             if labels and models.has_text(model.mode) else None)
    tags = model.tags(images, top_k) if models.has_head(model.mode) and top_k > 0 else None
  kind = "sigmoid, each label" if model.logit_bias is not None else "softmax over labels"
  lines = []
  i = -1
  for path in paths:
    lines.append(path)
    if path in errors:
      lines.append(f"  error: {errors[path]}")
      continue
    i += 1
    if probs is not None:
      lines.append(f"  zero-shot ({kind}):")
      for j in np.argsort(-probs[i], kind="stable"):
        lines.append(f"    {probs[i, j]:.4f}  {labels[j]}")
    if tags is not None:
      lines.append(f"  tags (class head, top {len(tags[i])}):")
      lines += [f"    {t.score:.4f}  {t.name}" for t in tags[i]]
  return "\n".join(lines), len(errors)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from superclip_jax import inference
  f = flags.FLAGS
  model = inference.load(f.workdir, f.step, dtype=f.dtype)
  if f.labels and not models.has_text(model.mode):
    logging.warning("model.mode='superclass' has no text tower: --labels ignored")
  report, failed = predict_and_count(model, f.image, f.labels, f.templates, f.top_k)
  print(report, flush=True)
  if failed:  # the others were predicted; the exit status still tells a script
    sys.exit(f"{failed} of {len(f.image)} images could not be read (see 'error:' above)")


def define_flags():
  """Flags of the command (defined only when run as one, so the module imports anywhere)."""
  flags.DEFINE_string("workdir", None, "The run's directory (config.json + checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_list("image", None, "Image file(s), comma-separated (any format PIL reads).")
  flags.DEFINE_list("labels", [], "Zero-shot labels, comma-separated (e.g. 'a cat,a dog').")
  flags.DEFINE_list("templates", ["{}"], "Prompt templates with one '{}' for the label, "
                    "averaged per label (default: the label itself).")
  flags.DEFINE_integer("top_k", 10, "How many class-head tags to print.")
  flags.DEFINE_string("dtype", None, "Compute dtype override, e.g. float32 on CPUs.")
  flags.mark_flags_as_required(["workdir", "image"])


if __name__ == "__main__":
  define_flags()
  app.run(cli.one_line_errors(main))
