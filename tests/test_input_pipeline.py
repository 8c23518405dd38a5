"""The input pipeline on tiny shards: sources, damaged data, multi-host splits, exact resume."""
import collections
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from superclip_jax import config_lib, tokenizer
from superclip_jax.data import bad_records, demo, input_pipeline, position, records, sources
from superclip_jax.data import tfds_source, transforms, webdataset
from superclip_jax.data import spec as data_spec
from superclip_jax.data.image_folder import image_folder_source
from superclip_jax.evaluators import eval_data

SIZE = 16  # model.image_size in these tests


# ---------------------------------------------------------------------------------------------
# Test data: solid-colour images whose colour encodes the record, captions naming the key, so
# that a batch row can be checked for image/caption alignment.

def _colour(i):
  return ((i * 37) % 200 + 30, (i * 91) % 200 + 30, (i * 53) % 200 + 30)


def _image(i, fmt="PNG", size=(24, 20)):
  out = io.BytesIO()
  Image.new("RGB", size, _colour(i)).save(out, fmt)
  return out.getvalue()


def _caption(key):
  return f"photo {key}"


def _key_of_tokens(tokens):
  return tokenizer.decode(tokens).replace(" ", "").removeprefix("photo")


def _write_tar(path, members):
  """members: (name, bytes); returns {name: offset of its header} for cutting the file."""
  offsets = {}
  with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
    for name, data in members:
      offsets[name] = tar.offset
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return offsets


def _good(key, i, fmt="PNG", extra=None):
  ext = "jpg" if fmt == "JPEG" else "png"
  members = [(f"{key}.{ext}", _image(i, fmt)), (f"{key}.txt", _caption(key).encode())]
  if extra:
    members.append((f"{key}.json", json.dumps(extra).encode()))
  return members


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
  """7 shards: 5 with good records (uneven sizes) and some damage, one of garbage, one empty.

  Returns (spec, good keys, bad-record counts one pass over the data produces).
  """
  root = tmp_path_factory.mktemp("wds")
  sizes = [7, 3, 12, 1, 5]
  good, index = [], 0
  for shard, n in enumerate(sizes):
    members = []
    for r in range(n):
      key = f"s{shard}r{r}"
      members += _good(key, index, "JPEG" if r % 3 == 0 else "PNG")
      good.append(key)
      index += 1
    if shard == 0:
      members += [("s0zero.jpg", b""), ("s0zero.txt", b"photo s0zero")]  # zero-byte image
      members += [("s0utf.png", _image(1)), ("s0utf.txt", b"photo \xff\xfe")]
    if shard == 2:
      jpeg = _image(2, "JPEG", (60, 50))
      members += [("s2trunc.jpg", jpeg[:len(jpeg) // 2]), ("s2trunc.txt", b"photo s2trunc")]
      members += [("s2nocap.png", _image(3))]
      members += [("s2noimg.txt", b"photo s2noimg"), ("s2noimg.json", b"{}")]
    if shard == 4:
      big = _image(4, "PNG", (200, 200))  # the tar ends inside this member
      members += [("s4cut.png", big), ("s4cut.txt", b"photo s4cut")]
    path = str(root / f"{shard:05d}.tar")
    offsets = _write_tar(path, members)
    if shard == 4:
      with open(path, "r+b") as f:
        f.truncate(offsets["s4cut.png"] + 512 + len(big) // 2)
  (root / "00005.tar").write_bytes(np.random.default_rng(0).bytes(3000))  # not a tar
  (root / "00006.tar").write_bytes(b"")  # zero bytes: not even an empty tar
  expected = {"bad_image": 2, "caption_not_utf8": 1, "missing_caption": 1, "missing_image": 1,
              "truncated_shard": 2, "corrupt_shard": 1}
  return f"wds:{root}/{{00000..00006}}.tar", good, expected


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory):
  """2 shards whose JSON has several captions and a long caption (for choice / dual)."""
  root = tmp_path_factory.mktemp("wds_json")
  for shard in range(2):
    members = []
    for r in range(10):
      key = f"c{shard}r{r}"
      extra = {"captions": [_caption(key), _caption(key + "x")],
               "long_caption": f"long caption of {key}"}
      if r == 3:
        del extra["long_caption"]  # the head falls back to the caption
      members += _good(key, shard * 10 + r, extra=extra)
    _write_tar(str(root / f"{shard}.tar"), members)
  return f"wds:{root}/{{0..1}}.tar"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  i = 0
  for name in ("cat", "dog", "fish"):
    (root / name).mkdir()
    for r in range(4):
      (root / name / f"{r}.png").write_bytes(_image(i))
      i += 1
  (root / "dog" / "notes.txt").write_text("not an image")
  return str(root)


def _config(data, batch=4, **fields):
  c = config_lib.base_config()
  c.model.image_size = SIZE
  c.model.context_length = 16
  c.input.batch_size = batch
  c.input.data = data
  c.input.shuffle_buffer = 5
  c.input.cycle_length = 2
  for k, v in fields.items():
    c.input[k] = v
  return c


def _batches(ds, n):
  it = ds.as_numpy_iterator()
  return [next(it) for _ in range(n)]


def _keys(batches):
  return [k.decode() for b in batches for k in b["_key"]]


def _check_alignment(batch):
  """Every row's caption, key and image colour belong to the same record."""
  pixels = batch["image"] * transforms.CLIP_STD + transforms.CLIP_MEAN
  for key, tokens, image in zip(batch["_key"], batch["tokens"], pixels):
    key = key.decode()
    assert _key_of_tokens(tokens) == key.lower()
    assert image.std(axis=(0, 1)).max() < 0.05  # a solid colour survived crop + resize


# ---------------------------------------------------------------------------------------------
# Spec strings and patterns.

def test_expand_braces():
  assert data_spec.expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
  assert data_spec.expand_braces("{8..10}") == ["8", "9", "10"]
  assert data_spec.expand_braces("x{a,b}{0..1}") == ["xa0", "xa1", "xb0", "xb1"]
  assert data_spec.expand_braces("plain.tar") == ["plain.tar"]


def test_parse_spec():
  assert data_spec.parse_spec("wds:gs://b/{0..9}.tar") == ("wds", "gs://b/{0..9}.tar", {})
  assert data_spec.parse_spec("gs://b/{0..9}.tar")[0] == "wds"
  assert data_spec.parse_spec("/d/x-{0..3}.tfrecord?text=caption") == (
      "tfrecord", "/d/x-{0..3}.tfrecord", {"text": "caption"})
  assert data_spec.parse_spec("demo") == ("demo", "", {})
  assert tfds_source._split_tfds_location("coco_captions:train", "s") == ("coco_captions", "train")
  assert tfds_source._split_tfds_location("mnist:3.0.1:train[:10%]", "s") == (
      "mnist:3.0.1", "train[:10%]")
  for bad in ("", "wds:", "shards/*.zip", "wds:/a.tar?colour=red"):
    with pytest.raises(ValueError):
      data_spec.parse_spec(bad)


def test_mixture_specs():
  assert data_spec.mixture("wds:/a/{0..1}.tar") == [("wds:/a/{0..1}.tar", 1.0)]
  assert data_spec.mixture(" wds:/a.tar?weight=0.7 ; tfds:coco:train?text=t&weight=3") == [
      ("wds:/a.tar", 0.7), ("tfds:coco:train?text=t", 3.0)]
  assert data_spec.mixture((("wds:/a.tar", 2), ("folder:/f", 1))) == [
      ("wds:/a.tar", 2.0), ("folder:/f", 1.0)]
  for bad in ("wds:/a.tar?weight=0;wds:/b.tar", "wds:/a.tar?weight=x", "demo;wds:/b.tar", ";"):
    with pytest.raises(ValueError):
      data_spec.mixture(bad)


def test_startup_errors_name_what_is_wrong(damaged_shards, tmp_path, image_folder):
  spec, _, _ = damaged_shards
  missing = spec.replace("00006", "00009")
  with pytest.raises(ValueError, match="00008.tar"):
    sources.from_spec(missing)
  assert len(sources.from_spec(missing, skip_missing_shards=True).paths) == 7
  with pytest.raises(ValueError, match="no file"):
    sources.from_spec(f"wds:{tmp_path}/*.tar")
  with pytest.raises(ValueError, match="caption.txt"):
    sources.from_spec(spec, data_spec.Fields(text="caption.txt"))
  with pytest.raises(ValueError, match="'webp'"):
    sources.from_spec(spec + "?image=webp")
  with pytest.raises(ValueError, match="json/caption"):
    sources.from_spec(spec + "?text=json/caption")
  with pytest.raises(ValueError, match="nowhere"):
    sources.from_spec(f"folder:{tmp_path}/nowhere")
  with pytest.raises(ValueError, match="no class subfolders"):
    sources.from_spec(f"folder:{tmp_path}")
  with pytest.raises(ValueError, match="not divisible"):
    position.local_batch_size(10, 3)


# ---------------------------------------------------------------------------------------------
# Reading tar shards.

def test_tar_reader_long_names_and_damage(tmp_path):
  long_dir = "d" * 120
  path = str(tmp_path / "long.tar")
  _write_tar(path, [(f"{long_dir}/k1.png", b"p1"), (f"{long_dir}/k1.txt", b"t1"),
                    ("k2.seg.png", b"p2"), ("k2.txt", b"t2"), ("._hidden.txt", b"x"),
                    ("noext", b"y")])
  samples = list(webdataset.read_shard(path))
  assert [s["__key__"] for s in samples] == [f"{long_dir}/k1", "k2"]
  assert samples[0]["png"] == b"p1" and samples[1]["seg.png"] == b"p2"
  assert samples[1]["txt"] == b"t2"
  # Flip a header byte: the checksum fails and the shard stops there, with one placeholder.
  data = bytearray(open(path, "rb").read())
  data[0] ^= 0x55
  corrupt = str(tmp_path / "corrupt.tar")
  open(corrupt, "wb").write(bytes(data))
  assert list(webdataset.read_shard(corrupt)) == [
      {"__key__": corrupt, webdataset.PROBLEM: "corrupt_shard"}]
  absent = str(tmp_path / "absent.tar")
  assert list(webdataset.read_shard(absent)) == [
      {"__key__": absent, webdataset.PROBLEM: "unreadable_file"}]


def _eval_rows(spec, batch):
  """(key from the first caption or None, bad) of every example the evaluators' image-text
  path yields for a spec."""
  data = eval_data.parse(spec, eval_data.CAPTIONS)
  batches = eval_data.image_text_data(data, _config(spec), batch, max_captions=1)
  return [(_key_of_tokens(tokens[0]) if mask[0] else None, bool(bad))
          for b in batches.as_numpy_iterator()
          for tokens, mask, bad in zip(b["tokens"], b["caption_mask"], b["bad"])]


def test_eval_pass_flags_damaged_records(damaged_shards):
  spec, good, _ = damaged_shards
  rows = _eval_rows(spec, 8)
  # Eval keeps records with a good image whatever their caption (s0utf, s2nocap) ...
  kept = [key for key, bad in rows if not bad]
  assert len(kept) == len(good) + 2 and set(good) <= set(kept)
  # ... and keeps those without one too, flagged: the number of examples never changes (a
  # damaged shard's placeholder record is no example).
  assert sorted(key for key, bad in rows if bad) == ["s0zero", "s2noimg", "s2trunc"]


def test_train_stream_keeps_every_good_record_and_counts_the_bad(damaged_shards):
  spec, good, expected = damaged_shards
  config = _config(spec)
  # 7 shards read 2 at a time: 2 epochs are 7 whole groups, so the first 2 * 28 examples are
  # exactly two passes over the good records.
  batches = _batches(input_pipeline.train_dataset(config, with_keys=True), 2 * len(good) // 4)
  counts = collections.Counter(_keys(batches))
  assert counts == {key: 2 for key in good}
  for batch in batches:
    _check_alignment(batch)
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (4, 16)
    np.testing.assert_array_equal(batch["class_tokens"], batch["tokens"])
  # Skipped records ride on the next good example: two passes consumed hold the first pass's
  # bad records and some of the second's (those before its last consumed good record).
  seen = dict(zip(bad_records.REASONS, sum(b["_skipped"].sum(0) for b in batches).tolist()))
  for reason in bad_records.REASONS:
    n = expected.get(reason, 0)
    assert n <= seen[reason] <= 2 * n, reason
  epochs = np.concatenate([b["_epoch"] for b in batches])
  assert epochs[0] == 0 and epochs[-1] == 1 and np.all(np.diff(epochs) >= 0)


# ---------------------------------------------------------------------------------------------
# Multi-host: disjoint, balanced, never starved.

@pytest.mark.parametrize("num_items", [1, 2, 3, 7, 12])
@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_processes_split_every_epoch_evenly(num_items, processes):
  per_process = 3 * num_items  # three epochs' worth of items for each process
  taken = [position.process_items(num_items, 0, 0, p, processes, 0, per_process)
           for p in range(processes)]
  # Global position of process p's j-th item is p + j * P: reassemble the global sequence.
  sequence = np.empty(per_process * processes, np.int64)
  for p, items in enumerate(taken):
    sequence[p::processes] = items
  for epoch in range(len(sequence) // num_items):
    chunk = sequence[epoch * num_items:(epoch + 1) * num_items]
    assert sorted(chunk) == list(range(num_items))  # each shard once per epoch, over all hosts
  np.testing.assert_array_equal(
      position.process_items(num_items, 0, 0, 1 % processes, processes, 2, 1),
      taken[1 % processes][2:3])  # any window is computed directly (a restart needs no replay)


def test_more_processes_than_shards_still_feeds_every_process(damaged_shards):
  spec, good, _ = damaged_shards
  config = _config(spec.replace("{00000..00006}", "{00000..00001}"), batch=6)
  keys = []
  for p in range(3):
    ds = input_pipeline.train_dataset(config, process_index=p, process_count=3, with_keys=True)
    batches = _batches(ds, 3)
    assert all(b["_position"][:, 0].tolist() == [p, p] for b in batches)
    keys.append(set(_keys(batches)))
  assert all(keys)


# ---------------------------------------------------------------------------------------------
# The data position: restart == uninterrupted.

def test_advance_position():
  table = np.zeros((2, 3, 2), np.int32)
  table[1, 2] = (7, 9)
  rows = np.array([[0, 0, 1, 5], [0, 0, 2, 0], [0, 0, 2, 3], [1, 1, 0, 4], [0, 0, 1, 9]],
                  np.int32)
  out = np.asarray(jax.jit(position.advance_position)(table, rows))
  assert out[0, 0].tolist() == [2, 4]  # the last record of the latest group, plus one
  assert out[1, 1].tolist() == [0, 5]
  assert out[1, 2].tolist() == [7, 9]  # absent from the batch: unchanged
  assert out[0, 1].tolist() == [0, 0] and out[0, 2].tolist() == [0, 0]


def _resume_matches(config, steps_before, steps_after, processes=1):
  """Reads steps_before + steps_after batches per process uninterrupted; then "restarts"
  from the position folded out of the first steps_before global batches; compares."""
  full = [_batches(input_pipeline.train_dataset(config, process_index=p,
                                                process_count=processes, with_keys=True),
                   steps_before + steps_after) for p in range(processes)]
  table = position.initial_position(config, processes)
  advance = jax.jit(position.advance_position)
  for step in range(steps_before):
    rows = np.concatenate([full[p][step]["_position"] for p in range(processes)])
    table = advance(table, rows)
  start = steps_before * config.input.batch_size
  for p in range(processes):
    resumed = _batches(input_pipeline.train_dataset(
        config, start=start, position=np.asarray(table), process_index=p,
        process_count=processes, with_keys=True), steps_after)
    for a, b in zip(full[p][steps_before:], resumed):
      assert set(a) == set(b)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  return full


def test_resume_is_exact_on_damaged_shards_across_hosts(damaged_shards):
  spec, _, _ = damaged_shards
  full = _resume_matches(_config(spec), steps_before=5, steps_after=4, processes=2)
  # The restart point lies inside a group (not trivially at a boundary).
  assert full[0][4]["_position"][-1, 3] > 0


def test_resume_is_exact_for_a_mixture(damaged_shards, image_folder):
  spec, _, _ = damaged_shards
  config = _config(f"{spec}?weight=2; folder:{image_folder}")
  full = _resume_matches(config, steps_before=4, steps_after=3)
  sources_seen = {int(s) for b in full[0] for s in b["_position"][:, 1]}
  assert sources_seen == {0, 1}


def test_resume_needs_the_position(damaged_shards):
  spec, _, _ = damaged_shards
  with pytest.raises(ValueError, match="data position"):
    input_pipeline.train_dataset(_config(spec), start=8)
  config = _config(spec)
  with pytest.raises(ValueError, match="processes"):
    input_pipeline.train_dataset(config, start=8,
                                 position=position.initial_position(config, 3))


def test_mixture_follows_the_weights(damaged_shards, image_folder):
  spec, _, _ = damaged_shards
  config = _config(f"{spec}?weight=3;folder:{image_folder}?weight=1", batch=20)
  batches = _batches(input_pipeline.train_dataset(config), 10)
  from_first = np.mean([b["_position"][:, 1] == 0 for b in batches])
  assert 0.68 <= from_first <= 0.82


# ---------------------------------------------------------------------------------------------
# Captions: random choice, dual captions.

def test_several_captions_and_dual_captions(caption_shards):
  config = _config(caption_shards, batch=10, text_key="json/captions",
                   long_text_key="json/long_caption")
  batches = _batches(input_pipeline.train_dataset(config, with_keys=True), 4)
  picked_alternative = 0
  for batch in batches:
    for key, tokens, class_tokens in zip(batch["_key"], batch["tokens"], batch["class_tokens"]):
      key = key.decode()
      chosen = _key_of_tokens(tokens)
      assert chosen in (key, key + "x")
      picked_alternative += chosen == key + "x"
      long = tokenizer.decode(class_tokens).replace(" ", "")
      assert long == (f"longcaptionof{key}" if not key.endswith("r3")
                      else tokenizer.decode(tokens).replace(" ", ""))
  assert 5 <= picked_alternative <= 35  # both captions get picked


# ---------------------------------------------------------------------------------------------
# Other sources.

def _write_tfrecords(path, keys, truncate=False, int_image_for=()):
  with tf.io.TFRecordWriter(path) as writer:
    for i, key in enumerate(keys):
      image = tf.train.Feature(bytes_list=tf.train.BytesList(value=[_image(i, "JPEG")]))
      if key in int_image_for:  # a malformed record: integers where the image bytes belong
        image = tf.train.Feature(int64_list=tf.train.Int64List(value=[10**12]))
      feature = {
          "jpg": image,
          "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_caption(key).encode()])),
          "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
          "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[24])),
      }
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())
  if truncate:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 30)


def test_img2dataset_tfrecords(tmp_path):
  _write_tfrecords(str(tmp_path / "00000.tfrecord"), [f"a{i}" for i in range(6)],
                   int_image_for=("a5",))
  _write_tfrecords(str(tmp_path / "00001.tfrecord"), [f"b{i}" for i in range(4)], truncate=True)
  spec = f"{tmp_path}/{{00000..00001}}.tfrecord"
  rows = _eval_rows(spec, 4)
  keys = [key for key, bad in rows if not bad]
  assert sorted(keys) == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)]
  assert [key for key, bad in rows if bad] == [None]  # the malformed record, flagged
  batches = _batches(input_pipeline.train_dataset(_config(spec), with_keys=True), 3)
  for batch in batches:
    _check_alignment(batch)
  with pytest.raises(ValueError, match="'caption'"):
    sources.from_spec(spec + "?text=caption")


def test_image_folder_source(image_folder, monkeypatch):
  source = image_folder_source(image_folder)
  assert source.classnames == ("cat", "dog", "fish")
  config = _config(f"folder:{image_folder}", batch=6)
  data = eval_data.parse(f"folder:{image_folder}", eval_data.LABELS)
  batches = list(eval_data.classification_data(data, config, 5).as_numpy_iterator())
  labels = np.concatenate([b["label"] for b in batches])
  assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
  first = records.unpack(next(source.eval_records().as_numpy_iterator()))
  assert first.texts == [b"a photo of a cat."]
  assert batches[0]["image"].shape == (5, SIZE, SIZE, 3) and len(batches[-1]["image"]) == 2
  # Two processes split the files between them.
  halves = []
  for p in range(2):
    with monkeypatch.context() as m:
      m.setattr(jax, "process_index", lambda: p)
      m.setattr(jax, "process_count", lambda: 2)
      halves.append(np.concatenate([b["label"] for b in eval_data.classification_data(
          data, config, 8).as_numpy_iterator()]))
  assert sorted(np.concatenate(halves).tolist()) == labels.tolist()
  batch = _batches(input_pipeline.train_dataset(config), 1)[0]
  names = {tokenizer.decode(t) for t in batch["tokens"]}
  assert names <= {f"a photo of a {c} ." for c in source.classnames}


def test_tfds_sources():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=10):
    labelled = tfds_source.tfds_source("cifar10", "train", label_key="label")
    assert labelled.classnames is not None
    data = eval_data.parse("tfds:cifar10:train", eval_data.LABELS)
    batch = next(eval_data.classification_data(data, _config("tfds:cifar10:train"), 4)
                 .as_numpy_iterator())
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["label"].shape == (4,)
    first = records.unpack(next(labelled.eval_records().as_numpy_iterator()))
    assert first.label == batch["label"][0]
    name = labelled.classnames[batch["label"][0]]
    assert first.texts[0].decode() == f"a photo of a {name}."
    # A captioned dataset, with a second text field as the long caption.
    config = _config("tfds:laion400m/images:train?text=caption&long_text=url", batch=4)
    full = _resume_matches(config, steps_before=3, steps_after=2)
    assert not np.array_equal(full[0][0]["tokens"], full[0][0]["class_tokens"])
    with pytest.raises(ValueError, match="captions/text"):
      tfds_source.tfds_source("laion400m/images", "train", text_key="captions/text")
    with pytest.raises(ValueError, match="training needs captions"):
      input_pipeline.train_dataset(_config("tfds:laion400m/images:train"))


def test_tfds_nested_feature_paths():
  tfds = pytest.importorskip("tensorflow_datasets")
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(),
      "captions": tfds.features.Sequence({"text": tfds.features.Text()})})
  assert isinstance(tfds_source._tfds_feature(features, "captions/text", "s", "text"),
                    tfds.features.Text)
  with pytest.raises(ValueError, match="captions/txt"):
    tfds_source._tfds_feature(features, "captions/txt", "s", "text")


def test_demo_source_resumes_from_examples_seen():
  config = _config("demo", batch=4)
  first = _batches(input_pipeline.train_dataset(config), 2)
  again = _batches(input_pipeline.train_dataset(config, start=4), 1)
  np.testing.assert_array_equal(first[1]["image"], again[0]["image"])
  assert first[0]["_position"].shape == (4, 4)
  assert position.position_shape(config, 1) == (1, 1, 2)


def test_demo_templates_choose_the_training_captions():
  """config.input.demo.templates: each training caption is one of the given phrasings, filled
  with that example's own attributes (drawn here from the generator's rng, independently of
  the pipeline); the default stays the built-in mix, unchanged."""
  templates = "a shape in the {pos}|a {size} {colour} {shape}"
  config = _config("demo", batch=8)
  default = _batches(input_pipeline.train_dataset(config), 1)[0]
  config.input.demo.templates = templates
  config_lib.validate(config)
  got = _batches(input_pipeline.train_dataset(config), 1)[0]
  decoded = tokenizer.decode(got["tokens"].tolist())
  for i, caption in enumerate(decoded):
    attrs = demo.sample_attributes(demo._rng(config.input.demo.seed, "train", i))
    assert caption in {t.format(**attrs) for t in templates.split("|")}, (i, caption)
    want = demo.example(config.input.demo.seed, "train", i, SIZE)["caption"]
    assert want == tokenizer.decode(default["tokens"][i].tolist())
  assert len(set(decoded)) > 2  # both phrasings, various attributes
  for bad, why in (("a {colour", "not a caption template"), ("a {weight} thing", "weight"),
                   ("a plain caption", "names no field"), ("a {shape}|", "names no field")):
    config.input.demo.templates = bad
    with pytest.raises(ValueError, match=rf"config\.input\.demo\.templates.*{why}"):
      config_lib.validate(config)


def test_demo_long_template_sets_the_long_caption_and_leaves_the_images():
  """config.input.demo.long_template: the head's long caption (and the evals' long captions) is
  the template filled with the example's own attributes (drawn here from the generator's rng,
  independently of the pipeline); the images are the built-in caption's, bit for bit."""
  template = "a {size} {shape} in the {pos} next to a {shape2} in the {pos2}"
  config = _config("demo", batch=8)
  config.model.context_length = 24
  config.input.demo.long_captions_for_head = True
  default = _batches(input_pipeline.train_dataset(config), 1)[0]
  config.input.demo.long_template = template
  config_lib.validate(config)
  got = _batches(input_pipeline.train_dataset(config), 1)[0]
  np.testing.assert_array_equal(got["image"], default["image"])
  np.testing.assert_array_equal(got["tokens"], default["tokens"])  # the short captions
  seed = config.input.demo.seed
  for i, caption in enumerate(tokenizer.decode(got["class_tokens"].tolist())):
    assert caption == template.format(**demo.sample_attributes(demo._rng(seed, "train", i)))
  evals = list(demo.eval_examples(config, "zeroshot", 0, 3, ("long_caption",))
               .as_numpy_iterator())
  for i, ex in enumerate(evals):
    attrs = demo.sample_attributes(demo._rng(seed, "zeroshot", i))
    assert ex["long_caption"].decode() == template.format(**attrs)
  # The built-in long caption's bound holds for every example.
  lengths = [len(tokenizer.encode(demo.example(seed, "train", i, SIZE)["long_caption"]))
             for i in range(300)]
  assert max(lengths) <= demo.longest_long_caption(demo._LONG_TEMPLATE, tokenizer.encode)
  for bad, why in (("a {shape}|a {pos}", "one template"), ("a plain caption", "names no field"),
                   ("a {weight} thing", "weight"), ("a {shape", "not a caption template")):
    config.input.demo.long_template = bad
    with pytest.raises(ValueError, match=rf"config\.input\.demo\.long_template.*{why}"):
      config_lib.validate(config)
  config.input.demo.long_template = template + " on a {bg} background and " + template
  with pytest.raises(ValueError, match=r"context_length=24 is too short for "
                                       r"config\.input\.demo\.long_template.*needs 3\d tokens"):
    config_lib.validate(config)


def test_batches_reach_the_devices_and_advance_the_position_in_a_jitted_step(damaged_shards):
  """What the train loop does: global arrays from prefetch_to_device, the table advanced in
  the step."""
  from superclip_jax import sharding
  spec, _, _ = damaged_shards
  config = _config(spec, batch=4 * jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  ds = input_pipeline.train_dataset(config)
  batches = input_pipeline.prefetch_to_device(ds.as_numpy_iterator(),
                                              sharding.batch_sharding(mesh))
  step = jax.jit(lambda table, batch: position.advance_position(table, batch["_position"]))
  table = position.initial_position(config)
  for _ in range(3):
    batch = next(batches)
    assert isinstance(batch["image"], jax.Array) and batch["image"].dtype == np.float32
    table = step(table, batch)
  assert np.asarray(table)[0, 0].tolist() == (np.asarray(batch["_position"])[-1, 2:] +
                                              [0, 1]).tolist()


# ---------------------------------------------------------------------------------------------
# Resuming with another number of processes (config.input.on_process_count_change).

def _consume(config, start, table, origin, processes, steps):
  """`steps` global batches read by `processes` processes from (start, table, origin): the
  batches of each process, and the table after each step (tables[s]: after s steps)."""
  per = [_batches(input_pipeline.train_dataset(
      config, start=start, position=np.asarray(table), origin=origin, process_index=p,
      process_count=processes, with_keys=True), steps) for p in range(processes)]
  advance = jax.jit(position.advance_position)
  tables = [np.asarray(table)]
  for step in range(steps):
    tables.append(np.asarray(advance(tables[-1], np.concatenate(
        [per[p][step]["_position"] for p in range(processes)]))))
  return per, tables


def test_demo_data_resumes_exactly_with_another_process_count():
  config = _config("demo", batch=4)
  one = _batches(input_pipeline.train_dataset(config, start=8), 2)
  two = [_batches(input_pipeline.train_dataset(config, start=8, process_index=p,
                                               process_count=2), 2) for p in range(2)]
  for step in range(2):  # process p's rows are rows [2p, 2p + 2) of the global batch
    np.testing.assert_array_equal(
        one[step]["image"], np.concatenate([two[p][step]["image"] for p in range(2)]))
  table, origin = position.resume_position(  # the default policy: demo needs none
      config, np.ones((2, 1, 2)), np.zeros((1, 2)), process_count=1)
  assert table.shape == (1, 1, 2) and not table.any() and origin.shape == (1, 2)


def test_restart_after_a_process_count_change_skips_nothing_and_resumes_exactly(
    damaged_shards):
  spec, _, _ = damaged_shards
  config = _config(spec)  # 7 shards (5 with good records), groups of 2, batch 4
  seed, num = position.data_seed(config), 7
  origin = np.zeros((1, 2), np.int32)
  before, tables = _consume(config, 0, position.initial_position(config, 2), origin, 2, 9)
  old_table = tables[-1]  # process 0 in its group 2, process 1 in its group 2 too
  with pytest.raises(ValueError, match="on_process_count_change='restart'"):
    position.resume_position(config, old_table, origin, process_count=1)

  config.input.on_process_count_change = "restart"
  table, new_origin = position.resume_position(config, old_table, origin, process_count=1)
  restart = int(new_origin[0, 0]) * num + int(new_origin[0, 1])
  assert restart == 8  # epoch 1, item 1: old process 0's group 2 starts there
  # The documented rule: old process p's items (global p + 2j) of groups before its current
  # one are finished; those of its current group are started. The restart is the first
  # unfinished item of any process; the started items at or after it are read again.
  k_old = 2
  finished = [p + 2 * j for p in range(2) for j in range(old_table[p, 0, 0] * k_old)]
  started = [p + 2 * j for p in range(2)
             for j in range(old_table[p, 0, 0] * k_old + k_old * (old_table[p, 0, 1] > 0))]
  assert restart == min(set(range(max(started) + 2)) - set(finished))
  repeated_items = [i for i in started if i >= restart]
  assert sources.build_sources(config)[0].restart_positions(
      old_table[:, 0], origin[0], 1, 2)[2] == len(repeated_items)
  assert table.shape == (1, 1, 2) and not table.any()

  after, after_tables = _consume(config, 36, table, new_origin, 1, 12)
  # Groups of the new stream (one process, 2 shards each) follow each other from `restart`:
  # all groups before the last one seen are complete.
  complete = int(max(b["_position"][:, 2].max() for b in after[0]))
  end = restart + 2 * complete
  assert end > max(started)  # the window covers everything the old processes opened
  sequence = position.process_items(num, seed, 0, 0, 1, 0, end)

  def records(shard_items):
    return collections.Counter(k for s in shard_items for k in good_by_shard[s])
  good_by_shard = collections.defaultdict(list)
  for key in damaged_shards[1]:
    good_by_shard[int(key[1])].append(key)
  expected = records(sequence)  # every record of global items [0, end)
  seen = collections.Counter(_keys([b for p in range(2) for b in before[p]]))
  seen += collections.Counter(k.decode() for b in after[0]
                              for k, g in zip(b["_key"], b["_position"][:, 2]) if g < complete)
  assert not expected - seen  # nothing skipped
  extra = seen - expected
  assert not extra - records(sequence[repeated_items])  # repeats only from re-read shards
  assert sum(extra.values()) > 0  # (this restart does repeat something)

  # Later resumes with the new count are exact again.
  resumed, _ = _consume(config, 36 + 6 * 4, after_tables[6], new_origin, 1, 6)
  for a, b in zip(after[0][6:], resumed[0]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_restart_of_an_image_folder_is_file_exact(image_folder):
  """Folder files are read in order: 2 -> 1 processes repeats nothing and skips nothing."""
  config = _config(f"folder:{image_folder}", batch=4, on_process_count_change="restart")
  origin = np.zeros((1, 2), np.int32)
  before, tables = _consume(config, 0, position.initial_position(config, 2), origin, 2, 4)
  table, new_origin = position.resume_position(config, tables[-1], origin, 1)
  assert new_origin.tolist() == [[1, 4]]  # 16 files read of 12 per epoch
  after, _ = _consume(config, 16, table, new_origin, 1, 3)
  source = sources.build_sources(config)[0]
  order = source.files[position.process_items(12, 0, 0, 0, 1, 0, 28)]
  got = [None] * 16
  for p in range(2):
    for i, key in enumerate(_keys(before[p])):
      got[p + 2 * i] = key
  assert got + _keys(after[0]) == [f for f in order.tolist()]


def test_tfds_restart_starts_at_the_least_advanced_epoch():
  rows = np.array([[3, 5], [2, 7], [4, 0]])
  origin, new_rows, repeated = tfds_source.TfdsSource.restart_positions(None, rows, (0, 0), 2, 8)
  assert new_rows.tolist() == [[2, 0], [2, 0]] and tuple(origin) == (0, 0)
  assert repeated == 2 + 1 + 2  # epochs 2-3 of process 0, 2 of process 1, 2-3 of process 2


# A script that keeps train_dataset iterators alive at exit (no `del it`) while the decode of
# the next batch is still running in TensorFlow's threads (slowed down so that it always is).
_ITERATORS_ALIVE_AT_EXIT = """
import sys, time
from superclip_jax import config_lib
from superclip_jax.data import input_pipeline, transforms
record = transforms.train_record
def slow_record(*args):
  time.sleep(0.05)
  return record(*args)
transforms.train_record = slow_record
config = config_lib.base_config()
config.model.image_size, config.model.context_length = 16, 16
config.input.data, config.input.batch_size, config.input.shuffle_buffer = sys.argv[1], 4, 8
ds = input_pipeline.train_dataset(config)
it, numpy_it = iter(ds), ds.as_numpy_iterator()
print("batches", next(it)["image"].shape, next(numpy_it)["image"].shape, flush=True)
"""


def test_a_script_may_exit_with_iterators_alive(image_folder):
  """Issue 17.6: an iterator freed during interpreter teardown waited forever for a Python
  call that teardown had ended (2 in 5 plain runs; every run with this slow decode). The
  atexit hook frees them first."""
  from tests import cpu_devices
  try:
    r = subprocess.run([sys.executable, "-c", _ITERATORS_ALIVE_AT_EXIT, f"folder:{image_folder}"],
                       cwd=cpu_devices.REPO, env=cpu_devices.env(1), capture_output=True,
                       text=True, timeout=90)
  except subprocess.TimeoutExpired:
    pytest.fail("the script hung at exit with tf.data iterators alive")
  assert r.returncode == 0 and "batches (4, 16, 16, 3) (4, 16, 16, 3)" in r.stdout, r.stderr[-3000:]


def test_closing_the_reader_does_not_wait_for_the_iterator_to_be_freed_but_exit_does():
  # Freeing a tf.data iterator can wait seconds for its autotuning thread (the study's runs
  # ended 13-26 s late). Here a generator whose cleanup takes 2 s stands for it.
  freed = []

  def slow_to_free():
    try:
      yield from range(100)
    finally:
      time.sleep(2)
      freed.append(True)

  batches = input_pipeline.host_batches(slow_to_free(), size=2)
  assert [next(batches) for _ in range(3)] == [0, 1, 2]
  start = time.monotonic()
  batches.close()
  assert time.monotonic() - start < 1.0 and not freed  # the reader frees it in the background
  input_pipeline._join_closing_readers()  # what exit runs (an atexit hook)
  assert freed == [True]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_small_folder_counts_each_file_in_its_own_pass(image_folder, processes):
  # 12 files, far fewer than one position group of 4,096: the group used to count as pass 0.
  config = _config(f"folder:{image_folder}", batch=4)
  by_pass = collections.defaultdict(list)
  for p in range(processes):
    ds = input_pipeline.train_dataset(config, process_index=p, process_count=processes,
                                      with_keys=True)
    batches = _batches(ds, 6)  # two passes (a batch of 4 is 2 rows a process of 2)
    for epoch, key in zip(np.concatenate([b["_epoch"] for b in batches]), _keys(batches)):
      by_pass[int(epoch)].append(key)
  # Independent expectation: the processes together read each of the 12 files once a pass.
  assert sorted(by_pass) == [0, 1]
  for keys in by_pass.values():
    assert len(keys) == 12 and len(set(keys)) == 12


def test_one_class_folder_warns_that_the_head_learns_nothing(tmp_path, image_folder):
  one = tmp_path / "one"
  (one / "cat").mkdir(parents=True)
  for i in range(2):
    (one / "cat" / f"{i}.png").write_bytes(_image(i))
  lines = []
  input_pipeline.train_dataset(_config(f"folder:{one}"), report=lines.append)
  assert any(line.startswith(f"Warning: folder:{one} has one class ('cat')") for line in lines)
  for data, mode in ((f"folder:{one}", "clip"), (f"folder:{image_folder}", "superclip"),
                     (f"folder:{one};folder:{image_folder}", "superclip")):
    lines = []
    config = _config(data)
    config.model.mode = mode
    input_pipeline.train_dataset(config, report=lines.append)
    assert not [line for line in lines if line.startswith("Warning")], (data, mode)
