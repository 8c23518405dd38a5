"""Our image transforms against OpenCLIP's (torchvision on PIL): the same pixels."""
import io

import numpy as np
import pytest
from PIL import Image

from superclip_jax.data import bad_records, transforms

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")
import torchvision.transforms as T  # noqa: E402  (after the importorskip)


def _photo(width, height, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
  image = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
  noisy = np.asarray(image, np.int16) + rng.integers(-20, 21, (height, width, 3))
  image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
  if mode == "P":
    return image.convert("P", palette=Image.Palette.ADAPTIVE)
  return image.convert(mode)


def _jpeg(image, quality=90):
  out = io.BytesIO()
  image.save(out, "JPEG", quality=quality)
  return out.getvalue()


def _hwc(tensor):
  return tensor.permute(1, 2, 0).numpy()


def _ours_normalized(pixels):
  return np.asarray(transforms.normalize(pixels))


@pytest.mark.parametrize("size,shape,mode", [
    (32, (57, 41), "RGB"), (32, (40, 90), "RGB"), (48, (33, 33), "RGB"), (64, (20, 30), "RGB"),
    (32, (50, 37), "L"), (32, (44, 60), "RGBA"), (32, (45, 61), "P"),
])
def test_eval_transform_equals_openclip(size, shape, mode):
  image = _photo(*shape, mode=mode)
  reference = open_clip.image_transform(size, is_train=False)(image)
  ours = _ours_normalized(transforms.eval_image(image, size))
  np.testing.assert_allclose(ours, _hwc(reference), atol=2e-6)


@pytest.mark.parametrize("box", [(0, 0, 50, 50), (3, 5, 47, 40), (10, 0, 40, 61), (1, 2, 3, 4)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_train_transform_equals_openclip_for_the_same_crop(box, mode, monkeypatch):
  image = _photo(61, 57, mode=mode)
  size = 32
  # OpenCLIP's train transform with its random box replaced by ours.
  monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(lambda *a, **k: box))
  reference = open_clip.image_transform(size, is_train=True)(image)
  ours = _ours_normalized(transforms.train_image(image, size, box))
  np.testing.assert_allclose(ours, _hwc(reference), atol=2e-6)


def test_openclip_train_transform_is_the_one_we_mirror():
  t = open_clip.image_transform(224, is_train=True)
  crop = t.transforms[0]
  assert isinstance(crop, T.RandomResizedCrop)
  assert crop.scale == transforms.TRAIN_SCALE
  assert crop.ratio == pytest.approx(transforms.RATIO)
  assert crop.interpolation == T.InterpolationMode.BICUBIC
  norm = t.transforms[-1]
  np.testing.assert_allclose(norm.mean, transforms.CLIP_MEAN, rtol=1e-7)
  np.testing.assert_allclose(norm.std, transforms.CLIP_STD, rtol=1e-7)


def test_normalize_matches_the_three_step_form():
  x = np.arange(256, dtype=np.uint8).repeat(3).reshape(256, 1, 3)
  expected = (x.astype(np.float64) / 255 - transforms.CLIP_MEAN) / transforms.CLIP_STD
  np.testing.assert_allclose(_ours_normalized(x), expected, atol=1e-6)


def test_crop_box_stays_inside_with_torchvision_bounds():
  rng = np.random.default_rng(0)
  for _ in range(300):
    width, height = (int(v) for v in rng.integers(8, 400, 2))
    u = rng.random(transforms.NUM_UNIFORMS)
    top, left, h, w = transforms.crop_box(width, height, u)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    assert h > 0 and w > 0
    if (w, h) != (width, height):  # a sampled box, or the fallback's clamped central crop
      assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1  # rounding to pixels moves the ratio a bit
    if 3 / 4 <= width / height <= 4 / 3:  # a box with 90-100% of the area exists
      assert w * h >= 0.88 * width * height


@pytest.mark.parametrize("width,height", [(300, 100), (100, 300), (200, 199)])
def test_crop_box_fallback_equals_torchvision(width, height):
  # A 3:1 image has no box with >= 90% of its area and ratio <= 4/3: every attempt fails and
  # both fall back to the same deterministic central crop. A near-square image: any box.
  image = Image.new("RGB", (width, height))
  ours = transforms.crop_box(width, height, np.full(transforms.NUM_UNIFORMS, 0.5))
  if width / height in (3.0, 1 / 3):
    theirs = T.RandomResizedCrop.get_params(image, list(transforms.TRAIN_SCALE),
                                            list(transforms.RATIO))
    assert ours == tuple(theirs)
  else:
    assert ours[2] * ours[3] >= 0.9 * width * height * 0.98


def test_crop_box_samples_like_torchvision():
  # Same distribution: compare the mean area fraction and aspect ratio over many draws.
  width, height = 320, 240
  rng = np.random.default_rng(1)
  ours = [transforms.crop_box(width, height, rng.random(transforms.NUM_UNIFORMS))
          for _ in range(2000)]
  torch.manual_seed(0)
  image = Image.new("RGB", (width, height))
  theirs = [T.RandomResizedCrop.get_params(image, [0.9, 1.0], [3 / 4, 4 / 3])
            for _ in range(2000)]
  for stat in (lambda b: b[2] * b[3] / (width * height), lambda b: b[3] / b[2],
               lambda b: b[0] / max(1, height - b[2]), lambda b: b[1] / max(1, width - b[3])):
    a, b = np.mean([stat(x) for x in ours]), np.mean([stat(x) for x in theirs])
    assert a == pytest.approx(b, rel=0.05, abs=0.02)


def test_train_record_picks_captions_and_reports_bad_records():
  u = np.full(transforms.NUM_UNIFORMS, 0.99, np.float32)
  jpeg = _jpeg(_photo(40, 30))
  pixels, caption, long_caption, status = transforms.train_record(
      jpeg, [b"", b"one", b"two"], [], u, 16)
  assert status == transforms.OK and pixels.shape == (16, 16, 3)
  assert caption == b"two" and long_caption == b"two"  # empty skipped; head falls back
  _, caption, long_caption, _ = transforms.train_record(jpeg, [b"x"], [b"\xff", b"long"], u, 16)
  assert long_caption == b"long"
  cases = [(jpeg, [b"\xff\xfe"], "caption_not_utf8"), (jpeg, [], "missing_caption"),
           (jpeg, [b"  "], "missing_caption"), (b"", [b"a"], "bad_image"),
           (jpeg[: len(jpeg) // 2], [b"a"], "bad_image"), (b"not an image", [b"a"], "bad_image")]
  for data, texts, reason in cases:
    *_, status = transforms.train_record(data, texts, [], u, 16)
    assert status == bad_records.code(reason) and bad_records.reason_of(status) == reason
