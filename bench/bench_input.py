"""Images per second per CPU core: the full train transform vs bare JPEG decoding, one run.

  python bench/bench_input.py            # 1,024 images, 5 runs each
  python bench/bench_input.py --quick    # 256 images, 3 runs each
  python bench/bench_input.py --data='wds:/data/shards/{00000..00009}.tar'   # your own data

Without --data it generates photo-like JPEGs (quality 95, sides uniform in 256..512 px, a mix
of smooth colour fields, texture and noise, ~40-100 kB) with varied captions and writes them as
webdataset shards in a temporary folder; --data takes instead any config.input.data spec (wds:,
tfrecord:, folder:, tfds:, a mixture) and its first --n readable images. Then it measures:
  decode:    PIL decode of every image to RGB (what the pipeline's decode costs), a plain loop;
  pipeline:  `input_pipeline.train_dataset` on that data, the whole path a training batch
             takes — tar reading, shuffle, decode, RandomResizedCrop (bicubic) to --size, CLIP
             normalisation, CLIP BPE tokenization, batching — the batches consumed as numpy.
Speed is images per second of process CPU time (all threads counted, so "per core", robust to
a shared machine); wall-clock images/s is printed too. Each row is the median of --runs; the
pipeline's first run (cold tokenizer caches, thread pools starting) is not counted.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def photo_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A JPEG that compresses like a photo: smooth colour regions, texture, sensor noise."""
  from PIL import Image
  base = rng.random((height // 32 + 2, width // 32 + 2, 3))
  field = np.asarray(Image.fromarray((base * 255).astype(np.uint8)).resize(
      (width, height), Image.Resampling.BICUBIC), np.float32)
  texture = rng.random((height // 4 + 1, width // 4 + 1)) * 255
  texture = np.asarray(Image.fromarray(texture.astype(np.uint8)).resize(
      (width, height), Image.Resampling.BILINEAR), np.float32)
  pixels = field + (texture[..., None] - 128) * 0.25 + rng.normal(0, 4, field.shape)
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=95)
  return out.getvalue()


def make_data(directory: str, n: int, seed: int = 0) -> tuple[list[bytes], str]:
  from bench_tokenizer import make_captions
  from superclip_jax.tools import make_shards
  rng = np.random.default_rng(seed)
  images = [photo_jpeg(rng, *rng.integers(256, 513, 2)) for _ in range(n)]
  captions = make_captions(n, seed)
  samples = []
  for i, (data, caption) in enumerate(zip(images, captions)):
    path = os.path.join(directory, f"img{i:05d}.jpg")
    with open(path, "wb") as f:
      f.write(data)
    samples.append(make_shards.Sample(path, caption))
  paths = make_shards.write_shards(samples, os.path.join(directory, "shards"),
                                   shard_size=max(1, n // 8))
  return images, make_shards.shard_spec(paths)


def read_images(spec: str, n: int) -> list[bytes]:
  """The image bytes of the first `n` readable records of `spec` (a mixture: in its order)."""
  from superclip_jax import config_lib
  from superclip_jax.data import records, sources
  config = config_lib.base_config()
  config.input.data = spec
  images: list[bytes] = []
  for source in sources.build_sources(config):  # checks paths and fields: clear errors
    for packed in source.eval_records().as_numpy_iterator():
      record = records.unpack(packed)
      if not record.problem and record.image:
        images.append(record.image)
      if len(images) == n:
        return images
  if not images:
    raise ValueError(f"--data={spec!r}: no readable image in it")
  return images


def bench_decode(images: list[bytes]) -> tuple[float, float]:
  from superclip_jax.data import transforms
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for data in images:
    transforms.decode(data).convert("RGB")
  return time.process_time() - cpu0, time.perf_counter() - wall0


def bench_pipeline(spec: str, n: int, size: int, batch: int, threads: int):
  from superclip_jax import config_lib
  from superclip_jax.data import input_pipeline
  config = config_lib.base_config()
  config.model.image_size = size
  config.input.data = spec
  config.input.batch_size = batch
  config.input.shuffle_buffer = 1000
  config.input.threads = threads
  ds = input_pipeline.train_dataset(config, start=0, process_index=0, process_count=1)
  it = ds.as_numpy_iterator()
  next(it)  # pipeline start-up (thread pools, first shard opens) is not timed
  cpu0, wall0 = time.process_time(), time.perf_counter()
  seen = 0
  while seen < n:
    seen += len(next(it)["image"])
  return seen, time.process_time() - cpu0, time.perf_counter() - wall0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=1024, help="images per timed run")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--threads", type=int, default=0, help="tf.data threads (0: default)")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--data", default="", help="a config.input.data spec to read instead of "
                      "generated JPEGs, e.g. 'wds:/data/{00000..00009}.tar' or 'folder:/data'")
  args = parser.parse_args()
  if args.quick:
    args.n, args.runs = 256, 3
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    if args.data:
      spec = args.data
      try:
        images = read_images(spec, args.n)
      except ValueError as e:  # a bad spec or path: its message, without a traceback
        sys.exit(f"bench_input.py: {e}")
      what = f"images of {spec}, read in {time.perf_counter() - t0:.1f}s"
    else:
      images, spec = make_data(tmp, args.n)
      what = f"JPEGs, 256..512 px; generated in {time.perf_counter() - t0:.1f}s"
    sizes = [len(d) for d in images]
    print(f"{len(images)} {what}; mean {np.mean(sizes) / 1e3:.0f} kB; cores visible: "
          f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    decode = [bench_decode(images) for _ in range(args.runs)]
    pipeline = [bench_pipeline(spec, args.n, args.size, args.batch, args.threads)
                for _ in range(args.runs + 1)][1:]

  def row(name, n, runs):
    per_core = statistics.median(n / cpu for cpu, _ in runs)
    wall = statistics.median(n / w for _, w in runs)
    print(f"{name:<34} {per_core:8.0f} img/s/core   {wall:8.0f} img/s wall")
    return per_core

  print(f"medians of {args.runs} runs of {args.n} images:")
  row("bare JPEG decode (PIL)", len(images), decode)
  rate = row(f"full train transform @{args.size}px", pipeline[0][0],
             [(cpu, wall) for _, cpu, wall in pipeline])
  print(f"target >= 400 img/s/core: {'met' if rate >= 400 else 'NOT met'}")


if __name__ == "__main__":
  main()
