"""bench/bench_input.py pointed at one's own data (--data=SPEC): shards and an image folder."""
import os
import re
import runpy
import subprocess
import sys

import pytest
from PIL import Image

from superclip_jax.tools import make_shards
from tests import cpu_devices

REPO = cpu_devices.REPO


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """3 classes x 6 JPEGs of different sizes and colours."""
  root = tmp_path_factory.mktemp("images")
  for c in range(3):
    os.makedirs(root / f"class{c}")
    for i in range(6):
      Image.new("RGB", (40 + 4 * i, 30 + 3 * c), (70 * c, 30 * i, 90)).save(
          root / f"class{c}" / f"{i}.jpg", quality=90)
  return str(root)


@pytest.fixture(scope="module")
def bench():
  return runpy.run_path(os.path.join(REPO, "bench", "bench_input.py"))


def test_read_images_of_a_folder_spec(folder, bench):
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
  got = bench["read_images"](f"folder:{folder}", 100)
  want = sorted(open(f, "rb").read() for f in files)
  assert sorted(got) == want  # every image once, byte for byte
  assert len(bench["read_images"](f"folder:{folder}", 5)) == 5


def test_bench_on_shards(folder, tmp_path):
  paths = make_shards.write_shards(make_shards.samples_from_folder(folder),
                                   str(tmp_path / "shards"), shard_size=5)
  spec = make_shards.shard_spec(paths)
  assert spec.endswith("{00000..00003}.tar")
  r = subprocess.run(
      [sys.executable, "bench/bench_input.py", f"--data={spec}", "--n=16", "--runs=1",
       "--batch=8", "--size=32"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"16 images of {spec}" in r.stdout, r.stdout
  rows = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(
      r"^(bare JPEG decode \(PIL\)|full train transform @32px)\s+(\d+) img/s/core", r.stdout,
      re.M)}
  assert len(rows) == 2 and all(v > 0 for v in rows.values()), r.stdout


def test_bad_spec_is_one_clear_line(tmp_path):
  r = subprocess.run(
      [sys.executable, "bench/bench_input.py", f"--data=wds:{tmp_path}/{{0..2}}.tar", "--n=4"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert r.returncode != 0
  assert "bench_input.py:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert str(tmp_path) in r.stderr
