"""make_shards: image folders and caption tables -> webdataset shards our pipeline reads."""
import csv
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from superclip_jax import config_lib
from superclip_jax.data import webdataset
from superclip_jax.evaluators import eval_data
from superclip_jax.tools import make_shards


def _save(path, colour, fmt=None, size=(20, 16)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, colour).save(path, fmt)


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / "images"
  for c, name in enumerate(("golden_retriever", "tabby")):
    for i in range(3):
      _save(str(root / name / f"{i}.jpg"), (40 * c + 10 * i, 90, 200))
  _save(str(root / "tabby" / "3.bmp"), (1, 2, 3), "BMP")  # re-encoded as JPEG
  (root / "tabby" / "3.txt").write_text("a sidecar caption\n")
  (root / "tabby" / "broken.png").write_bytes(b"\x89PNG broken")
  return str(root)


def test_folder_to_shards_and_back(folder, tmp_path, capsys):
  out = str(tmp_path / "shards")
  paths = make_shards.write_shards(make_shards.samples_from_folder(folder), out, shard_size=3,
                                   max_size=0)
  assert "broken.png" in capsys.readouterr().out  # reported, skipped
  assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
  samples = [s for p in paths for s in webdataset.read_shard(p)]
  keys = [s["__key__"] for s in samples]
  assert keys[:4] == ["000000", "000001", "000002", "000010"]
  by_caption = {s["txt"].decode(): s for s in samples}
  assert "a photo of a golden retriever." in by_caption
  sidecar = by_caption["a sidecar caption"]
  assert "jpg" in sidecar and Image.open(io.BytesIO(sidecar["jpg"])).format == "JPEG"
  meta = json.loads(sidecar["json"])
  assert meta["label"] == 1 and meta["class"] == "tabby" and sidecar["cls"] == b"1"
  spec = make_shards.shard_spec(paths)
  assert spec == f"wds:{out}/{{00000..00002}}.tar"
  config = config_lib.base_config()
  config.model.image_size = 16
  data = eval_data.parse(spec + "?label=cls", eval_data.LABELS)
  labels = np.concatenate([b["label"] for b in eval_data.classification_data(
      data, config, 4).as_numpy_iterator()])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1]


def test_tables_to_shards(tmp_path):
  images = tmp_path / "img"
  for i in range(4):
    _save(str(images / f"{i}.png"), (i * 50, 0, 0), size=(40, 30))
  rows = [{"path": f"img/{i}.png", "title": f"red {i}", "recap": f"a long caption {i}"}
          for i in range(4)]
  with open(tmp_path / "t.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["path", "title", "recap"])
    writer.writeheader()
    writer.writerows(rows)
  with open(tmp_path / "t.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  for table in ("t.csv", "t.jsonl"):
    samples = make_shards.samples_from_table(str(tmp_path / table), "path", "title", "recap")
    out = str(tmp_path / f"out_{table}")
    paths = make_shards.write_shards(samples, out, shard_size=10, max_size=20, seed=None)
    got = list(webdataset.read_shard(paths[0]))
    assert [s["txt"] for s in got] == [f"red {i}".encode() for i in range(4)]
    assert json.loads(got[2]["json"])["long_caption"] == "a long caption 2"
    assert Image.open(io.BytesIO(got[0]["jpg"])).size == (27, 20)  # shortest side -> 20
  with pytest.raises(ValueError, match="no column 'caption'"):
    list(make_shards.samples_from_table(str(tmp_path / "t.csv"), "path"))
  with pytest.raises(ValueError, match="does not exist"):
    list(make_shards.samples_from_table(str(tmp_path / "absent.csv")))


def test_shards_are_plain_ustar(tmp_path, folder):
  paths = make_shards.write_shards(make_shards.samples_from_folder(folder), str(tmp_path / "s"),
                                   shard_size=100)
  with tarfile.open(paths[0]) as tar:
    members = tar.getmembers()
  assert all(m.mtime == 0 and m.isfile() for m in members)
  assert [m.name for m in members[:4]] == ["0000000.jpg", "0000000.txt", "0000000.json",
                                           "0000000.cls"]  # shard 00000, index 00


def _contents(paths):
  """Every sample's (source image, caption, class) and each shard's set of classes."""
  shards = [[json.loads(s["json"]) for s in webdataset.read_shard(p)] for p in paths]
  samples = [(m["source"], m["caption"], m.get("class")) for shard in shards for m in shard]
  return samples, [{m.get("class") for m in shard} for shard in shards]


def _read_bytes(paths):
  return [pathlib.Path(p).read_bytes() for p in paths]


@pytest.fixture
def sorted_folder(tmp_path):
  """4 classes x 8 images: read in order, the classes come one after another."""
  root = tmp_path / "sorted"
  for c in range(4):
    for i in range(8):
      _save(str(root / f"class{c}" / f"{i}.png"), (60 * c, 8 * i, 0), "PNG", size=(4, 4))
  return str(root)


def test_shuffle_mixes_classes_across_shards(sorted_folder, tmp_path):
  expected = [(s.image_path, s.caption, s.classname)
              for s in make_shards.samples_from_folder(sorted_folder)]
  write = lambda name, seed: make_shards.write_shards(
      make_shards.samples_from_folder(sorted_folder), str(tmp_path / name), shard_size=8,
      seed=seed)
  # In order, each shard holds one class: the skew a reader of few shards at a time sees.
  ordered, classes = _contents(write("ordered", None))
  assert ordered == expected and classes == [{f"class{c}"} for c in range(4)]
  paths = write("seed0", 0)
  samples, classes = _contents(paths)
  assert len(paths) == 4 and all(len(c) >= 3 for c in classes), classes
  assert samples != expected and sorted(samples) == sorted(expected)  # none lost or repeated
  assert _read_bytes(write("seed0_again", 0)) == _read_bytes(paths)  # the seed decides
  assert _contents(write("seed1", 1))[0] != samples
  # The same order as the documented Python function's.
  assert [s[0] for s in samples] == [
      s.image_path for s in make_shards.shuffled(make_shards.samples_from_folder(sorted_folder),
                                                 0)]


def test_command_line(tmp_path, sorted_folder):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  runs = {}
  for name, extra in (("default", []), ("no_shuffle", ["--noshuffle"])):
    out = str(tmp_path / name)
    result = subprocess.run(
        [sys.executable, "-m", "superclip_jax.tools.make_shards", f"--input={sorted_folder}",
         f"--output={out}", "--shard_size=10"] + extra, capture_output=True, text=True,
        timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert f"wds:{out}/{{00000..00003}}.tar" in result.stdout
    runs[name] = sorted(os.path.join(out, f) for f in os.listdir(out))
  # The default is seed 0's shuffle; --noshuffle keeps the folder's order.
  want = make_shards.write_shards(make_shards.samples_from_folder(sorted_folder),
                                  str(tmp_path / "api"), shard_size=10, seed=0)
  assert _read_bytes(runs["default"]) == _read_bytes(want)
  ordered, _ = _contents(runs["no_shuffle"])
  assert [s[0] for s in ordered] == [
      s.image_path for s in make_shards.samples_from_folder(sorted_folder)]


def test_jsonl_captions_are_strings_or_lists_of_them(tmp_path, capsys):
  _save(str(tmp_path / "img" / "0.png"), (9, 9, 9))
  cells = [["a red square", "a square"], None, 42, True, {"x": 1}, [], ["ok", 3], "plain"]
  with open(tmp_path / "t.jsonl", "w") as f:
    f.writelines(json.dumps({"image": "img/0.png", "caption": c}) + "\n" for c in cells)
  stats = {}
  paths = make_shards.write_shards(make_shards.samples_from_table(str(tmp_path / "t.jsonl")),
                                   str(tmp_path / "out"), seed=None, stats=stats)
  got = [json.loads(s["json"]) for s in webdataset.read_shard(paths[0])]
  assert [g["captions"] for g in got] == [["a red square", "a square"], ["plain"]]
  assert [g["caption"] for g in got] == ["a red square", "plain"]
  assert stats == {"several_captions": 1}
  skipped = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
  assert [line.split(" row ")[1].split(":")[0] for line in skipped] == ["2", "3", "4", "5", "6",
                                                                       "7"]
  assert "is null (null)" in skipped[0] and "is a number (42)" in skipped[1]
  assert "is a boolean (true)" in skipped[2] and 'is an object ({"x": 1})' in skipped[3]
  assert "is a list holding a number" in skipped[5] and "is an empty list" in skipped[4]
  assert make_shards.shard_spec(paths, True).endswith(".tar?text=json/captions")
