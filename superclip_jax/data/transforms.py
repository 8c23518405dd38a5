"""Image transforms equal to OpenCLIP's, pixel for pixel, and the per-record train/eval steps.

OpenCLIP preprocesses with torchvision on PIL images; we use PIL the same way, so an image that
goes through `train_image` with the same crop box, or through `eval_image`, comes out with the
same uint8 pixels (tests/test_transforms.py checks both against open_clip):
  * train: RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3), bicubic) -> RGB.
    `crop_box` is torchvision's sampling algorithm; its random numbers come from
    `position_uniforms`, a hash of the record's data position, so a record is cropped the same
    way whenever it is read (a resumed run equals an uninterrupted one).
  * eval: resize the shortest side to `size` (bicubic; the long side `int(size * long / short)`)
    -> center crop (offsets rounded as torchvision does) -> RGB.
  * normalize: /255, minus CLIP's mean, over CLIP's std (done per batch, in `input_pipeline`).

`train_record` / `eval_record` are the bodies of the tf.data map: they decode, choose a
caption and crop, and report a bad record (its `bad_records.code` as status) instead of raising.

Images that are not 8-bit become 8-bit in `decode` (training, evaluation and predict alike),
because PIL's own convert('RGB') clips them: a 16-bit grey PNG comes out white, a float TIFF
black. 16-bit and 32-bit integer grey ('I;16*', 'I') is read as 16-bit data and shifted right
by 8 bits, as torchvision's `to_dtype(uint16 -> uint8, scale=True)` and scikit-image's
`img_as_ubyte` do (so 'I' data of 8-bit range comes out dark: such files are rare); float grey
('F') in [0, 1] is scaled by 255 and rounded, as `img_as_ubyte` does. Values outside those
ranges (and NaN) have no 8-bit reading: `decode` raises `UnsupportedImage`, and a record is
skipped and counted as 'unsupported_image'.
"""
from __future__ import annotations

import io
import math
import threading
import warnings

import numpy as np
from absl import logging
from PIL import Image

from superclip_jax.data import bad_records

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
TRAIN_SCALE = (0.9, 1.0)
RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes, then a center crop
# Random numbers one train record uses: 2 per crop attempt, the box offsets, 2 caption picks.
NUM_UNIFORMS = 2 * CROP_ATTEMPTS + 2 + 2

OK = 0
BAD = 1  # the record is skipped (train_record's status is bad_records.code(reason) > 0)


class UnsupportedImage(ValueError):
  """An image that decodes but whose values have no 8-bit reading (module docstring)."""


# PIL warns on each open of an image above MAX_IMAGE_PIXELS (and refuses twice that): once per
# crop of the same image, epoch after epoch. `decode` says it once per process instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_bomb_said = threading.Event()


def decode(data: bytes) -> Image.Image:
  """Encoded image bytes -> a fully decoded PIL image in a mode of 8 bits a channel (any of
  PIL's: 'L', 'RGB', 'RGBA', 'P', 'CMYK', ...). Raises on bad data, UnsupportedImage on
  values with no 8-bit reading."""
  image = Image.open(io.BytesIO(data))
  image.load()
  limit = Image.MAX_IMAGE_PIXELS
  if limit and image.width * image.height > limit and not _bomb_said.is_set():
    _bomb_said.set()
    logging.warning("An image of %dx%d pixels (%s) is above PIL's Image.MAX_IMAGE_PIXELS=%d, "
                    "its decompression-bomb limit, and was decoded (PIL refuses above twice "
                    "that). Said once per process; raise the limit if such images are expected.",
                    image.width, image.height, image.format, limit)
  return to_8bit(image)


def to_8bit(image: Image.Image) -> Image.Image:
  """16- and 32-bit integer and float grey images as 'L' (module docstring); others as they
  are. Raises UnsupportedImage on values outside the ranges read."""
  if image.mode.startswith("I;16") or image.mode == "I":
    values = np.asarray(image)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
      raise UnsupportedImage(f"{image.mode} image with values {low}..{high}: outside the "
                             "16-bit range 0..65535 that is read")
    return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8), "L")
  if image.mode == "F":
    values = np.asarray(image, np.float32)
    if not np.all(np.isfinite(values)) or (values.size and not (
        values.min() >= 0.0 and values.max() <= 1.0)):
      raise UnsupportedImage("float image ('F') with values outside [0, 1] or not finite: no "
                             "8-bit reading")
    return Image.fromarray(np.round(values * 255.0).astype(np.uint8), "L")
  return image


def crop_box(width: int, height: int, uniforms, scale=TRAIN_SCALE,
             ratio=RATIO) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params with given U[0,1) numbers -> (top, left, h, w).

  uniforms: at least 2 * CROP_ATTEMPTS + 2 numbers in [0, 1): (area, log-ratio) per attempt,
  then the top and left offsets of the accepted box.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for attempt in range(CROP_ATTEMPTS):
    u_area, u_ratio = uniforms[2 * attempt], uniforms[2 * attempt + 1]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      u_top, u_left = uniforms[2 * CROP_ATTEMPTS], uniforms[2 * CROP_ATTEMPTS + 1]
      top = min(int(u_top * (height - h + 1)), height - h)
      left = min(int(u_left * (width - w + 1)), width - w)
      return top, left, h, w
  # No attempt fitted: the central crop with the aspect ratio clamped to `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's output function on uint64 arrays (wrapping arithmetic): a strong hash."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def position_uniforms(seed: int, groups, offsets, n: int = NUM_UNIFORMS) -> np.ndarray:
  """[len(groups), n] numbers in [0, 1) that depend only on (seed, group, offset): a record's
  crop and caption choice are the same whenever (and on whichever host) it is read."""
  groups = np.asarray(groups, np.int64).astype(np.uint64)
  offsets = np.asarray(offsets, np.int64).astype(np.uint64)
  with np.errstate(over="ignore"):
    key = _splitmix64(_splitmix64(np.full(groups.shape, seed, np.uint64)) ^
                      ((groups << np.uint64(32)) | offsets))
    counters = key[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * np.uint64(
        0xD1B54A32D192ED03)
    bits = _splitmix64(counters) >> np.uint64(11)  # 53 random bits
  return bits.astype(np.float64) * (1.0 / (1 << 53))


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
  # 8-bit first (images not from `decode`): PIL cannot resample 16-bit modes bicubically, and
  # its convert('RGB') would clip them.
  return to_8bit(image).resize(size, Image.Resampling.BICUBIC)


def _rgb_array(image: Image.Image) -> np.ndarray:
  return np.asarray(to_8bit(image).convert("RGB"), dtype=np.uint8)


def train_image(image: Image.Image, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
  """Crop `box` = (top, left, h, w), bicubic resize to size x size, RGB: uint8 [size, size, 3].

  Same as torchvision's resized_crop on PIL followed by convert('RGB') (OpenCLIP's order).
  """
  top, left, h, w = box
  # Crop first: PIL's resize(box=...) would also weigh pixels just outside the box.
  return _rgb_array(_resize(image.crop((left, top, left + w, top + h)), (size, size)))


def eval_image(image: Image.Image, size: int) -> np.ndarray:
  """Shortest side to `size` (bicubic), center crop, RGB: uint8 [size, size, 3]."""
  width, height = image.size
  short, long = min(width, height), max(width, height)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if width <= height else (new_long, size)
  if (new_w, new_h) != (width, height):
    image = _resize(image, (new_w, new_h))
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return _rgb_array(image.crop((left, top, left + size, top + size)))


# (x / 255 - mean) / std as one multiply-subtract (within 1e-6 of the three-step form).
_SCALE = (1.0 / (255.0 * CLIP_STD.astype(np.float64))).astype(np.float32)
_OFFSET = (CLIP_MEAN.astype(np.float64) / CLIP_STD.astype(np.float64)).astype(np.float32)


def normalize(images_uint8):
  """uint8 [..., H, W, 3] -> float32 CLIP-normalised (tf tensors or numpy arrays)."""
  import tensorflow as tf
  x = tf.cast(images_uint8, tf.float32)
  # Per-channel constants tiled to [H, W, 3]: broadcasting a [3] vector makes TensorFlow's CPU
  # kernels loop over runs of 3 elements, 3-4x slower than this.
  hw = tf.shape(x)[-3:-1]
  shape = tf.concat([hw, [3]], axis=0)
  scale = tf.reshape(tf.tile(_SCALE, [hw[0] * hw[1]]), shape)
  offset = tf.reshape(tf.tile(_OFFSET, [hw[0] * hw[1]]), shape)
  return x * scale - offset


def _valid_captions(texts) -> tuple[list[bytes], str | None]:
  """Non-empty UTF-8 captions among `texts`, and why there are none (a bad_records reason)."""
  good, not_utf8 = [], False
  for text in texts:
    text = bytes(text)
    if not text.strip():
      continue
    try:
      text.decode("utf-8")
    except UnicodeDecodeError:
      not_utf8 = True
      continue
    good.append(text)
  if good:
    return good, None
  return good, "caption_not_utf8" if not_utf8 else "missing_caption"


def _pick(options: list[bytes], u: float) -> bytes:
  return options[min(int(u * len(options)), len(options) - 1)]


def _decoded(data: bytes) -> tuple[Image.Image | None, str]:
  """(the image, '') or (None, its bad_records reason)."""
  if not data:  # a zero-byte file
    return None, "bad_image"
  try:
    return decode(data), ""
  except UnsupportedImage:
    return None, "unsupported_image"
  except Exception:  # noqa: BLE001  PIL raises many types on bad data (and bombs)
    return None, "bad_image"


def train_record(image_bytes, texts, long_texts, uniforms, size: int, scale=TRAIN_SCALE):
  """One training record -> (image uint8 [size, size, 3], caption, long caption, status).

  texts / long_texts: candidate captions (bytes); one is chosen at random (uniforms[-2],
  uniforms[-1]). A record without a usable image or caption has status BAD (zeros image);
  a record without a usable long caption uses its caption for the head. A bad record's
  status is bad_records.code(why) (zeros image).
  """
  def skipped(why):
    return np.zeros((size, size, 3), np.uint8), b"", b"", np.int32(bad_records.code(why))
  captions, why = _valid_captions(texts)
  if why is not None:
    return skipped(why)
  image, why = _decoded(bytes(image_bytes))
  if image is None:
    return skipped(why)
  try:
    pixels = train_image(image, size, crop_box(image.size[0], image.size[1], uniforms, scale))
  except Exception:  # noqa: BLE001  decoders can fail lazily, and odd modes in resize
    return skipped("bad_image")
  caption = _pick(captions, uniforms[-2])
  long_captions, _ = _valid_captions(long_texts)
  long_caption = _pick(long_captions, uniforms[-1]) if long_captions else caption
  return pixels, caption, long_caption, np.int32(OK)


def eval_record(image_bytes, size: int):
  """One evaluation image -> (image uint8 [size, size, 3], status)."""
  image, _ = _decoded(bytes(image_bytes))
  if image is None:
    return np.zeros((size, size, 3), np.uint8), np.int32(BAD)
  try:
    return eval_image(image, size), np.int32(OK)
  except Exception:  # noqa: BLE001
    return np.zeros((size, size, 3), np.uint8), np.int32(BAD)
