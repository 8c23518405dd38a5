"""Images that are not 8-bit: converted the way torchvision / scikit-image read them, in
training, evaluation and predict alike, or skipped and counted (issue 33 §2)."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from superclip_jax import predict
from superclip_jax.data import bad_records, transforms

SIZE = 16


def _encoded(image, fmt):
  out = io.BytesIO()
  image.save(out, fmt)
  return out.getvalue()


def _grey(rng, shape=(20, 24)):
  return rng.integers(0, 65536, shape, dtype=np.uint16)


def _paths(image_bytes, size=SIZE):
  """(train pixels, eval pixels) of one record, as the pipeline makes them."""
  uniforms = transforms.position_uniforms(0, [0], [0])[0]
  train, _, _, status = transforms.train_record(image_bytes, [b"a caption"], [], uniforms, size)
  evaluated, eval_status = transforms.eval_record(image_bytes, size)
  return train, status, evaluated, eval_status, uniforms


def _expected(grey_uint8, uniforms, size=SIZE):
  """The same crop and resize of an 8-bit grey image made by numpy: the independent part is
  the conversion (16-bit >> 8, as torchvision's to_dtype(scale=True); float * 255 rounded, as
  scikit-image's img_as_ubyte)."""
  image = Image.fromarray(grey_uint8, "L")
  box = transforms.crop_box(image.width, image.height, uniforms)
  return transforms.train_image(image, size, box), transforms.eval_image(image, size)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_grey_is_shifted_to_8_bits_not_clipped_to_white(mode, tmp_path):
  rng = np.random.default_rng(0)
  values = _grey(rng)
  h, w = values.shape
  image = {"I;16": lambda: Image.fromarray(values),  # what a 16-bit grey PNG opens as
           "I;16B": lambda: Image.frombytes("I;16B", (w, h), values.astype(">u2").tobytes()),
           "I": lambda: Image.fromarray(values.astype(np.int32))}[mode]()
  assert image.mode == mode
  data = _encoded(image, "PNG" if mode == "I;16" else "TIFF")
  assert Image.open(io.BytesIO(data)).mode.startswith("I")  # the file really is 16/32-bit
  train, status, evaluated, eval_status, uniforms = _paths(data)
  want_train, want_eval = _expected((values >> 8).astype(np.uint8), uniforms)
  assert status == transforms.OK and eval_status == transforms.OK
  np.testing.assert_array_equal(train, want_train)
  np.testing.assert_array_equal(evaluated, want_eval)
  assert train.min() < 100 and train.max() > 150  # not white (the old result), not black
  path = tmp_path / "grey.png"
  path.write_bytes(data)
  np.testing.assert_array_equal(np.asarray(predict.read_image(str(path))),
                                (values >> 8).astype(np.uint8))


def test_float_grey_in_0_1_is_scaled_and_outside_it_is_counted():
  rng = np.random.default_rng(1)
  values = rng.random((20, 24)).astype(np.float32)
  data = _encoded(Image.fromarray(values), "TIFF")
  train, status, evaluated, _, uniforms = _paths(data)
  want_train, want_eval = _expected(np.round(values * 255).astype(np.uint8), uniforms)
  assert status == transforms.OK
  np.testing.assert_array_equal(train, want_train)
  np.testing.assert_array_equal(evaluated, want_eval)
  for bad in (np.where(values > 0.5, np.nan, values), values * 300.0):
    data = _encoded(Image.fromarray(bad.astype(np.float32)), "TIFF")
    _, status, _, eval_status, _ = _paths(data)
    assert bad_records.reason_of(status) == "unsupported_image"
    assert eval_status == transforms.BAD
    with pytest.raises(transforms.UnsupportedImage, match="no 8-bit reading"):
      transforms.decode(data)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "1", "L"])
def test_8_bit_modes_go_through_pils_own_conversion(mode):
  rng = np.random.default_rng(2)
  rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "RGB")
  image = rgb.convert(mode)
  data = _encoded(image, "TIFF" if mode == "CMYK" else "PNG")
  train, status, _, _, uniforms = _paths(data)
  decoded = Image.open(io.BytesIO(data))
  box = transforms.crop_box(decoded.width, decoded.height, uniforms)
  assert status == transforms.OK
  np.testing.assert_array_equal(train, transforms.train_image(decoded, SIZE, box))


def test_a_large_image_past_the_bomb_limit_warns_once(monkeypatch, caplog):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 20 x 24 = 480: warned, not refused
  monkeypatch.setattr(transforms, "_bomb_said", type(transforms._bomb_said)())
  data = _encoded(Image.new("RGB", (24, 20), (1, 2, 3)), "PNG")
  with caplog.at_level(logging.WARNING):
    for _ in range(5):
      assert _paths(data)[1] == transforms.OK
  said = [r for r in caplog.records if "MAX_IMAGE_PIXELS=300" in r.getMessage()]
  assert len(said) == 1 and "24x20" in said[0].getMessage()


def test_make_shards_re_encodes_16_bit_tiffs_as_training_reads_them(tmp_path):
  from superclip_jax.data import webdataset
  from superclip_jax.tools import make_shards
  values = _grey(np.random.default_rng(3))
  (tmp_path / "in" / "cls").mkdir(parents=True)
  Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes()).save(
      tmp_path / "in" / "cls" / "a.tif")
  paths = make_shards.write_shards(make_shards.samples_from_folder(str(tmp_path / "in")),
                                   str(tmp_path / "out"), seed=None)
  (sample,) = webdataset.read_shard(paths[0])
  got = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"), np.int32)
  assert np.abs(got - (values >> 8)).mean() < 8  # JPEG q95 of the shifted image, not white
