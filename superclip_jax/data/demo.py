"""The built-in demo data: procedurally rendered shapes with captions, deterministic by seed.

Each example is an image of one main object (shape, colour, size, position) and a smaller
second object on a light or dark background, with
  * a short caption about the main object (several phrasings: "a large red circle in the top
    left", "a blue square", ...), and
  * a long caption describing both objects and the background.
Example `i` of a split depends only on (seed, split, i) (and, for training,
`config.input.demo.templates`: the short captions' phrasings), so any position of the stream
can be produced directly: resuming is exact and each host can render its own slice.

Held-out splits ('zeroshot', 'retrieval') use a different stream from 'train'. Zero-shot tasks
ask for the main object's colour, shape or position.

As tf.data: `train_rows` (training: this process's rows of each global batch, from any
example on) and `eval_examples` (evaluation); both render through `tf_batch`.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from superclip_jax.data import position, transforms

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
    "yellow": (230, 210, 40), "purple": (150, 60, 190), "orange": (240, 140, 30),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS = {"dark": (30, 30, 35), "light": (200, 200, 190)}
SPLITS = {"train": 0, "zeroshot": 1, "retrieval": 2}

# Zero-shot tasks: attribute -> (class names, prompt templates). The templates are phrasings
# the captions use, as CLIP's ImageNet templates are phrasings of web captions.
ZEROSHOT_TASKS = {
    "colour": (COLOUR_NAMES, ("a {} shape", "a photo of a {} object", "a {} object")),
    "shape": (SHAPES, ("a {}", "a photo of a {}", "a {} on a plain background")),
    "position": (POSITIONS, ("a shape in the {}", "an object in the {} of the image")),
}

_SHORT_TEMPLATES = (
    "a {size} {colour} {shape}",
    "a {colour} {shape}",
    "a {colour} {shape} in the {pos}",
    "a {size} {colour} {shape} in the {pos}",
    "a photo of a {colour} {shape}",
    "a photo of a {size} {shape}",
    "a {shape}",
    "a photo of a {shape}",
    "a {shape} on a plain background",
    "a {colour} shape",
    "a {colour} object",
    "a photo of a {colour} object",
    "a {size} {colour} shape in the {pos}",
    "a shape in the {pos}",
    "an object in the {pos} of the image",
    "a {colour} {shape} on a {bg} background",
)
_LONG_TEMPLATE = ("a photo of a {size} {colour} {shape} in the {pos} of the image on a {bg} "
                  "background, next to a small {colour2} {shape2} in the {pos2}")

# Region centres (fractions of the image side) for each position name.
_CENTRES = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
            "bottom right": (0.72, 0.72), "center": (0.5, 0.5)}


_FIELDS = ("size", "colour", "shape", "pos", "bg")
_LONG_FIELDS = _FIELDS + ("colour2", "shape2", "pos2")  # and the second object's


def _check_template(template: str, fields: tuple[str, ...], option: str, how: str,
                    single: bool = False) -> str:
  """`template` if it is a caption template naming some of `fields` (`single`: and not
  several, '|'-separated); else a ValueError naming config.input.demo.`option` and saying
  `how` to write one."""
  try:
    if single and "|" in template:
      raise ValueError("one template, not '|'-separated ones")
    if not template or template.format(**{f: f for f in fields}) == template:
      raise ValueError("it names no field")
  except (KeyError, IndexError, ValueError) as e:
    names = " ".join("{" + f + "}" for f in fields)
    raise ValueError(f"config.input.demo.{option}: {template!r} is not a caption template "
                     f"({e}): write {how.format(fields=names)}") from None
  return template


def parse_templates(templates: str | None) -> tuple[str, ...]:
  """config.input.demo.templates ('|'-separated; '' or None: the built-in short templates)."""
  if not templates:
    return _SHORT_TEMPLATES
  how = ("'|'-separated templates using the fields {fields}, e.g. "
         "'a {{colour}} {{shape}}|a shape in the {{pos}}'")
  return tuple(_check_template(t.strip(), _FIELDS, "templates", how)
               for t in templates.split("|"))


def parse_long_template(template: str | None) -> str:
  """config.input.demo.long_template ('' or None: the built-in long caption, which names every
  attribute of both objects). One template: choosing among several would draw from the
  example's rng and so change its image."""
  if not template:
    return _LONG_TEMPLATE
  how = ("one template using the fields {fields}, e.g. 'a photo of a {{size}} {{shape}} in "
         "the {{pos}} of the image next to a small {{shape2}} in the {{pos2}}'")
  return _check_template(template, _LONG_FIELDS, "long_template", how, single=True)


def longest_long_caption(template: str, encode) -> int:
  """Tokens (by `encode`, without start and end) of `template` filled with each field's
  longest value: what the context must hold for every long caption."""
  values = {"size": SIZES, "colour": COLOUR_NAMES, "shape": SHAPES, "pos": POSITIONS,
            "bg": tuple(BACKGROUNDS), "colour2": COLOUR_NAMES, "shape2": SHAPES,
            "pos2": POSITIONS}
  longest = {f: max(v, key=lambda x: len(encode(x))) for f, v in values.items()}
  return len(encode(template.format(**longest)))


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS[split], index])


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dx, dy = x - cx, y - cy
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  if shape == "triangle":  # apex up
    t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
  if shape == "cross":
    arm = 0.35 * r
    return (((np.abs(dx) <= arm) & (np.abs(dy) <= r)) |
            ((np.abs(dy) <= arm) & (np.abs(dx) <= r)))
  raise ValueError(shape)


def sample_attributes(rng: np.random.Generator) -> dict:
  a = {
      "shape": SHAPES[rng.integers(len(SHAPES))],
      "colour": COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
      "size": SIZES[rng.integers(len(SIZES))],
      "pos": POSITIONS[rng.integers(len(POSITIONS))],
      "bg": tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
  }
  # The second object sits in another region and has another colour.
  a["pos2"] = [p for p in POSITIONS if p != a["pos"]][rng.integers(len(POSITIONS) - 1)]
  a["colour2"] = [c for c in COLOUR_NAMES if c != a["colour"]][
      rng.integers(len(COLOUR_NAMES) - 1)]
  a["shape2"] = SHAPES[rng.integers(len(SHAPES))]
  return a


def render(attrs: dict, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """-> uint8 [image_size, image_size, 3]."""
  s = image_size
  img = np.empty((s, s, 3), np.float32)
  img[:] = BACKGROUNDS[attrs["bg"]]
  # The second object is clearly smaller than even a small main object, so that which object
  # a short caption describes is never ambiguous.
  objects = [(attrs["shape2"], attrs["colour2"], 0.07, attrs["pos2"]),
             (attrs["shape"], attrs["colour"], 0.15 if attrs["size"] == "small" else 0.22,
              attrs["pos"])]
  for shape, colour, radius, pos in objects:  # main object last, on top
    fx, fy = _CENTRES[pos]
    cx = (fx + rng.uniform(-0.05, 0.05)) * s
    cy = (fy + rng.uniform(-0.05, 0.05)) * s
    r = radius * s * rng.uniform(0.9, 1.1)
    tint = np.asarray(COLOURS[colour], np.float32) + rng.normal(0, 12, 3)
    img[_mask(shape, s, cx, cy, r)] = tint
  img += rng.normal(0, 6, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def example(seed: int, split: str, index: int, image_size: int,
            templates: tuple[str, ...] = _SHORT_TEMPLATES,
            long_template: str = _LONG_TEMPLATE) -> dict:
  """One example: image uint8 [H, W, 3], caption, long_caption, and the attribute labels.
  `templates`: the short caption's choices (`parse_templates`); `long_template`: the long
  caption's (`parse_long_template`). Neither changes the image."""
  rng = _rng(seed, split, index)
  a = sample_attributes(rng)
  caption = templates[rng.integers(len(templates))].format(**a)
  long_caption = long_template.format(**a)
  return {
      "image": render(a, image_size, rng),
      "caption": caption,
      "long_caption": long_caption,
      "colour": COLOUR_NAMES.index(a["colour"]),
      "shape": SHAPES.index(a["shape"]),
      "position": POSITIONS.index(a["pos"]),
  }


def batch(seed: int, split: str, indices, image_size: int,
          templates: tuple[str, ...] = _SHORT_TEMPLATES,
          long_template: str = _LONG_TEMPLATE) -> dict:
  """Examples for `indices` stacked: image [n, H, W, 3] uint8, captions as bytes arrays."""
  exs = [example(seed, split, int(i), image_size, templates, long_template) for i in indices]
  out = {k: np.stack([e[k] for e in exs]) for k in ("image", "colour", "shape", "position")}
  for k in ("caption", "long_caption"):
    out[k] = np.array([e[k].encode() for e in exs], dtype=object)
  out["colour"] = out["colour"].astype(np.int32)
  out["shape"] = out["shape"].astype(np.int32)
  out["position"] = out["position"].astype(np.int32)
  return out


# ---------------------------------------------------------------------------------------------
# As tf.data.

def tf_batch(seed: int, split: str, indices, image_size: int,
             fields: tuple[str, ...], templates: tuple[str, ...] = _SHORT_TEMPLATES,
             long_template: str = _LONG_TEMPLATE) -> dict:
  """`batch` as a TensorFlow op: indices int64 [n] -> {'image': uint8 [n, S, S, 3], and each
  of `fields` (caption, long_caption: string [n]; colour, shape, position: int32 [n])}."""
  types = {"caption": tf.string, "long_caption": tf.string, "colour": tf.int32,
           "shape": tf.int32, "position": tf.int32}

  def render(idx):
    b = batch(seed, split, idx, image_size, templates, long_template)
    return (b["image"], *(b[f] for f in fields))

  image, *values = tf.numpy_function(render, [indices], [tf.uint8, *(types[f] for f in fields)],
                                     stateful=False)
  image.set_shape([None, image_size, image_size, 3])
  n = tf.shape(indices)[0]
  return {"image": image, **{f: tf.reshape(v, [n]) for f, v in zip(fields, values)}}


def train_rows(config, start: int, process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's rows of the global training batches from global example `start` on:
  image uint8 [b, S, S, 3], caption and long_caption string [b], _position int32 [b, 4]."""
  global_batch = config.input.batch_size
  local = position.local_batch_size(global_batch, process_count)
  first = start + process_index * local
  # Batch k holds global rows [start + k*B, start + (k+1)*B); this process takes its slice.
  rows = tf.data.Dataset.range(first, np.iinfo(np.int64).max, global_batch).map(
      lambda i: tf.range(i, i + local))

  templates = parse_templates(config.input.demo.get("templates"))
  long_template = parse_long_template(config.input.demo.get("long_template"))

  def render(idx):
    b = tf_batch(config.input.demo.seed, "train", idx, config.model.image_size,
                 ("caption", "long_caption"), templates, long_template)
    if config.input.demo.get("caption", "short") == "long":
      b["caption"] = b["long_caption"]
    # The demo resumes from examples_seen; its position rows are unused.
    return {**b, "_position": tf.tile([[process_index, 0, 0, 0]], [tf.shape(idx)[0], 1])}

  return rows.map(render, num_parallel_calls=tf.data.AUTOTUNE)


def eval_examples(config, split: str, start: int, stop: int,
                  fields: tuple[str, ...]) -> tf.data.Dataset:
  """Examples start..stop-1 of a demo split at the model's size, unbatched: image float32
  [S, S, 3] (CLIP-normalised), bad bool (always False), and each of `fields`."""
  long_template = parse_long_template(config.input.demo.get("long_template"))

  def to_examples(indices):
    b = tf_batch(config.input.demo.seed, split, indices, config.model.image_size, fields,
                 long_template=long_template)
    return {"image": transforms.normalize(b["image"]),
            "bad": tf.zeros([tf.shape(b["image"])[0]], bool), **{f: b[f] for f in fields}}

  ds = tf.data.Dataset.range(start, stop).batch(64)
  return ds.map(to_examples, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
