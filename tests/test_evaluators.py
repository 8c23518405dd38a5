"""Evaluators: metrics against independent references, known embeddings, padding, many hosts.

Two kinds of model:
  * `KnownModel` — embeddings fixed by the test (an image's embedding is picked by its grey
    level, a caption's by its first word), so the right metric is known exactly: perfect
    recall, a permutation, ties;
  * the tiny real model (mu/8, 32 px, context 12), checked against straightforward loops over
    the same data (TFDS `mock_data`), without batching or padding.
The multi-host test runs two real processes (jax.distributed over gloo on the CPU).
"""
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from superclip_jax import classnames, evaluators, sharding, tokenizer, train_state
from superclip_jax.data import image_folder, transforms
from superclip_jax.evaluators import common, eval_data, linear_probe, retrieval, zeroshot
from tests.test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("cat dog car tree house bird fish boat road book cup hat shoe bed sun moon star door "
         "key lamp").split()  # one BPE token each (checked in KnownModel)
FILLERS = ("red", "blue", "green", "big", "small")


def grey_level(i: int) -> int:
  """The grey level that tells KnownModel an image is number i (i < 55)."""
  return 12 + 4 * i


def grey_image(i: int, height=40, width=52) -> np.ndarray:
  return np.full((height, width, 3), grey_level(i), np.uint8)


class KnownModel:
  """Duck-types `model.apply` with embeddings chosen by the test.

  encode_image: row `round((level - 12) / 4)` of image_table, `level` being the image's
  grey level (constant images stay constant through resizing); encode_text: the row of
  text_table for the caption's first word (WORDS[j] -> row j).
  """

  def __init__(self, image_table, text_table):
    self.image_table = jnp.asarray(image_table, jnp.float32)
    self.text_table = jnp.asarray(text_table, jnp.float32)
    lookup = np.zeros((tokenizer.VOCAB_SIZE,), np.int32)
    for row, word in enumerate(WORDS[:len(text_table)]):
      ids = tokenizer.encode(word)
      assert len(ids) == 1, word
      lookup[ids[0]] = row
    self.lookup = jnp.asarray(lookup)

  def apply(self, variables, x, method, normalize=True):
    del variables
    if method == "encode_image":
      level = (x[:, 0, 0, 0] * transforms.CLIP_STD[0] + transforms.CLIP_MEAN[0]) * 255
      row = jnp.clip(jnp.round((level - 12) / 4).astype(jnp.int32), 0,
                     len(self.image_table) - 1)
      z = self.image_table[row]
      return (_normalize(z) if normalize else z), z
    if method == "encode_text":
      z = self.text_table[self.lookup[x[:, 1]]]
      return _normalize(z) if normalize else z
    raise ValueError(method)


def _normalize(z):
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(tiny_config().mesh)


@pytest.fixture(scope="module")
def tiny():
  """(config, model, params) of the tiny real model."""
  config = tiny_config()
  factory = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
  return config, factory.model, factory.create().params


# --- Class names and prompt templates ---------------------------------------------------------


def test_class_name_lists_have_the_published_sizes():
  assert len(classnames.IMAGENET_CLASSNAMES) == 1000
  assert classnames.IMAGENET_CLASSNAMES[0] == "tench"  # n01440764, the first sorted id
  assert len(classnames.OPENAI_IMAGENET_TEMPLATES) == 80
  assert len(classnames.CIFAR10_CLASSNAMES) == 10
  assert len(classnames.CIFAR100_CLASSNAMES) == 100
  assert len(classnames.CIFAR_TEMPLATES) == 18
  for t in classnames.OPENAI_IMAGENET_TEMPLATES + classnames.CIFAR_TEMPLATES:
    assert t.count("{}") == 1, t


def test_class_names_and_templates_equal_openclip():
  meta = pytest.importorskip("open_clip.zero_shot_metadata")
  assert classnames.IMAGENET_CLASSNAMES == tuple(meta.IMAGENET_CLASSNAMES)
  ours = [t.format("golden retriever") for t in classnames.OPENAI_IMAGENET_TEMPLATES]
  assert ours == [f("golden retriever") for f in meta.OPENAI_IMAGENET_TEMPLATES]


def test_imagenet_labels_are_in_sorted_wordnet_id_order():
  """TFDS label i is the i-th sorted WordNet id: the same order as the ILSVRC folder layout
  (sorted class folders), so one class-name list serves both sources."""
  tfds = pytest.importorskip("tensorflow_datasets")
  wnids = tfds.builder("imagenet2012").info.features["label"].names
  assert len(wnids) == 1000 and wnids == sorted(wnids)


def test_zeroshot_resolves_names_and_rejects_bad_templates():
  names, templates = zeroshot.resolve("cifar100", None)
  assert names[1] == "aquarium fish" and templates == classnames.CIFAR_TEMPLATES
  assert zeroshot.resolve("imagenet", None)[1] == classnames.OPENAI_IMAGENET_TEMPLATES
  assert zeroshot.resolve(["a", "b"], ["x {}"]) == (("a", "b"), ("x {}",))
  with pytest.raises(ValueError, match="has no .{}. for the class name"):
    zeroshot.resolve(["a"], ["no slot"])
  with pytest.raises(ValueError, match="imagenet21k"):
    zeroshot.resolve("imagenet21k", None)


# --- Ranks, recall and the tie rule -----------------------------------------------------------


def test_rank_of_true_counts_ties_and_nans_against_the_model():
  scores = jnp.array([[0.1, 0.9, 0.5],   # true 1: best -> 0
                      [0.5, 0.5, 0.5],   # true 0: two ties -> 2
                      [0.2, 0.7, 0.7],   # true 2: one tie above -> 1
                      [np.nan, 0.1, 0.0],  # true 1: a NaN competitor counts against -> 1
                      [0.3, np.nan, 0.1]])  # true 1: a NaN true score is never a hit -> 2
  ranks = common.rank_of_true(scores, jnp.array([1, 0, 2, 1, 1]))
  np.testing.assert_array_equal(ranks, [0, 2, 1, 1, 2])
  assert common.topk_accuracy(np.asarray(ranks), (1, 2), 3) == {"top1": 0.2, "top2": 0.6}


def _reference_ranks(zimg, ztxt, text_image):
  """Retrieval ranks by sorting every query's candidates: at equal scores wrong ones first."""
  sim = zimg.astype(np.float64) @ ztxt.astype(np.float64).T
  image_ranks = []
  for i in range(len(zimg)):
    right = text_image == i
    if not right.any():
      image_ranks.append(-1)
      continue
    order = sorted(range(len(ztxt)), key=lambda j: (-sim[i, j], bool(right[j])))
    image_ranks.append(next(r for r, j in enumerate(order) if right[j]))
  text_ranks = []
  for j in range(len(ztxt)):
    order = sorted(range(len(zimg)), key=lambda i: (-sim[i, j], i == text_image[j]))
    text_ranks.append(order.index(text_image[j]))
  return np.array(image_ranks), np.array(text_ranks)


def test_retrieval_ranks_equal_a_sorting_reference(monkeypatch):
  rng = np.random.default_rng(0)
  zimg = rng.normal(size=(23, 8)).astype(np.float32)
  text_image = np.repeat(np.arange(23), rng.integers(0, 4, 23))  # some images: no caption
  ztxt = (zimg[text_image] + rng.normal(0, 1.0, (len(text_image), 8))).astype(np.float32)
  # Exact ties: a caption that duplicates another image's caption.
  ztxt[0] = ztxt[-1]
  expected = _reference_ranks(zimg, ztxt, text_image)
  for block in (1 << 24, 7):  # one block, and many small ones
    monkeypatch.setattr(retrieval, "_BLOCK", block)
    got = retrieval.retrieval_ranks(zimg, ztxt, text_image)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
  metrics = retrieval.recall_at_k(*got, ks=(1, 5))
  queries = expected[0][expected[0] >= 0]
  assert metrics["image_to_text_R@5"] == pytest.approx(np.mean(queries < 5))
  assert metrics["text_to_image_R@1"] == pytest.approx(np.mean(expected[1] < 1))


# --- Batching, padding, hosts -----------------------------------------------------------------


def test_host_slices_partition_the_data_contiguously():
  for n in range(0, 30):
    for count in (1, 2, 3, 8):
      slices = [common.host_slice(n, i, count) for i in range(count)]
      assert slices[0][0] == 0 and slices[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
      sizes = [b - a for a, b in slices]
      assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n", [1, 7, 8, 13, 16])
def test_batched_fn_counts_every_example_once_in_order(mesh, n):
  x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  label = np.arange(n, dtype=np.int32) % 4
  fn = common.BatchedFn(lambda scale, b: {"y": b["x"].sum(axis=1) * scale}, mesh,
                        keep=("label",))
  out = fn(np.float32(2.0), {"x": x, "label": label}, batch_size=8)
  np.testing.assert_array_equal(out["y"], 6.0 * np.arange(n))
  np.testing.assert_array_equal(out["label"], label)
  # The same through tf.data batches with a short last batch.
  ds = tf.data.Dataset.from_tensor_slices({"x": x, "label": label}).batch(8)
  np.testing.assert_array_equal(fn(np.float32(2.0), ds, batch_size=8)["y"], out["y"])


def test_eval_batch_size_must_divide_over_devices(mesh):
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    common.local_batch_size(0, mesh)


WORKER = r"""
import json, pickle, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, sys.argv[3])
from tests.test_evaluators import run_demo_evals
with open(sys.argv[4], "rb") as f:
  params = pickle.load(f)
print("RESULT", json.dumps(run_demo_evals(params)), flush=True)
"""


def run_demo_evals(params) -> dict:
  """Zero-shot and retrieval on demo data with counts that leave partial batches (the
  2-process test runs this in each process and compares with one process)."""
  config = tiny_config()
  config.evals.zeroshot = dict(type="zeroshot", num_examples=13, batch_size=4)
  config.evals.retrieval = dict(type="retrieval", num_examples=11, batch_size=4)
  mesh = sharding.make_mesh(config.mesh)
  params = jax.device_put(params, sharding.replicated(mesh))
  model = train_state.StateFactory(config, mesh).model
  return {name: ev.run(params) for name, _, ev in evaluators.build(config, model, mesh)}


def test_two_processes_count_every_example_once_and_match_one_process(tiny, tmp_path):
  """Two real processes (one CPU device each): 13 and 11 examples at a global batch of 4
  give each process shares of 7/6 and 6/5 and partial batches; the metrics equal one
  process's."""
  params = jax.tree.map(np.asarray, tiny[2])
  with open(tmp_path / "params.pkl", "wb") as f:
    pickle.dump(params, f)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"localhost:{port}", str(i), REPO,
                             str(tmp_path / "params.pkl")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  single = run_demo_evals(params)
  results = []
  for p in procs:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT", 1)[1]))
  assert results[0] == results[1]
  assert results[0]["zeroshot"]["num_examples"] == 13
  assert results[0]["retrieval"]["num_images"] == 11
  assert results[0]["retrieval"]["num_captions"] == 22
  for name in single:
    for k, v in single[name].items():
      assert results[0][name][k] == pytest.approx(v, abs=1e-6), (name, k)


# --- Known embeddings through the real data paths ---------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
  return tf.io.encode_png(pixels).numpy()


def _mock_coco(images, captions):
  """A TFDS `as_dataset` replacement for coco_captions: these PNG-encoded images (what the
  input pipeline reads, undecoded) with these captions."""
  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    def examples():
      for image, texts in zip(images, captions):
        yield {"image": _png(image), "captions": {"text": texts}}
    return tf.data.Dataset.from_generator(examples, output_signature={
        "image": tf.TensorSpec([], tf.string),
        "captions": {"text": tf.TensorSpec([None], tf.string)}})
  return as_dataset


def _retrieval_with(model, mesh, num_images=13, max_captions=3):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = tiny_config()
  ev = retrieval.RetrievalEvaluator(config, model, mesh, data="tfds:coco_captions:test",
                                    batch_size=8, max_captions=max_captions)
  images = [grey_image(i, 30 + i, 45) for i in range(num_images)]
  captions = [[f"{WORDS[i]} {FILLERS[c]}" for c in range(i % 5 + 1)] for i in range(num_images)]
  with tfds.testing.mock_data(as_dataset_fn=_mock_coco(images, captions)):
    return ev.run({})


def test_retrieval_of_known_embeddings_perfect_permuted_and_tied(mesh):
  n = 13
  eye = np.eye(n, dtype=np.float32)
  expected_captions = float(sum(min(i % 5 + 1, 3) for i in range(n)))

  perfect = _retrieval_with(KnownModel(eye, eye), mesh)
  assert perfect["num_images"] == n and perfect["num_captions"] == expected_captions
  assert all(perfect[f"{d}_R@{k}"] == 1.0 for d in ("image_to_text", "text_to_image")
             for k in (1, 5, 10))

  # Image i looks like image perm[i]: only the fixed points 0-4 can be found. A moved image
  # scores 0 with its own captions and with every caption but perm[i]'s: all ties, which
  # count against the model, so it is missed at every K <= 10; likewise its captions.
  perm = np.array([0, 1, 2, 3, 4, 6, 7, 5, 9, 10, 11, 12, 8])
  permuted = _retrieval_with(KnownModel(eye[perm], eye), mesh)
  fixed_captions = sum(min(i % 5 + 1, 3) for i in range(5))
  for k in (1, 5, 10):
    assert permuted[f"image_to_text_R@{k}"] == pytest.approx(5 / n), k
    assert permuted[f"text_to_image_R@{k}"] == pytest.approx(fixed_captions / expected_captions)

  # Everything scores the same: no hits (ties count against the model).
  ones = np.ones((n, 4), np.float32)
  tied = _retrieval_with(KnownModel(ones, ones), mesh)
  assert all(tied[f"{d}_R@{k}"] == 0.0 for d in ("image_to_text", "text_to_image")
             for k in (1, 5, 10))


def _write_png(path, pixels):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path)


def test_zeroshot_on_an_ilsvrc_style_image_folder(tmp_path, mesh):
  # Class folders created out of order: labels follow the sorted names (n01 -> 0).
  root = tmp_path / "val"
  for cls in (2, 0, 1):
    for j in range(3 + cls):  # 3, 4, 5 images: 12 in all, a partial last batch of 8
      _write_png(str(root / f"n0{cls + 1}" / f"ILSVRC2012_val_{cls}{j}.JPEG.png"),
                 grey_image(cls, 36 + j, 36))
  source = image_folder.image_folder_source(str(root))
  assert source.classnames == ("n01", "n02", "n03")
  assert list(source.labels) == [0] * 3 + [1] * 4 + [2] * 5

  config = tiny_config()
  eye = np.eye(3, dtype=np.float32)
  # 'folder:PATH' gives what dict(source='image_folder', path=PATH) gave before.
  cfg = dict(data=f"folder:{root}", batch_size=8, classnames=list(WORDS[:3]),
             templates=["{}", "{} photo"])
  metrics = zeroshot.ZeroShotEvaluator(config, KnownModel(eye, eye), mesh, **cfg).run({})
  assert metrics == {"top1": 1.0, "num_examples": 12.0, "num_bad_images": 0.0}
  ones = np.ones((3, 2), np.float32)
  tied = zeroshot.ZeroShotEvaluator(config, KnownModel(ones, ones), mesh, **cfg).run({})
  assert tied["top1"] == 0.0
  # The same folder through common.from_config, as config.evals names it.
  by_config = common.from_config(zeroshot.ZeroShotEvaluator, dict(cfg, type="zeroshot"),
                                 config, KnownModel(eye, eye), mesh)
  assert by_config.run({}) == metrics

  # A file that does not decode stays in the count, as a black image, and is reported.
  (root / "n02" / "broken.jpg").write_bytes(b"not an image")
  metrics = zeroshot.ZeroShotEvaluator(config, KnownModel(eye, eye), mesh, **cfg).run({})
  assert metrics["num_examples"] == 13.0 and metrics["num_bad_images"] == 1.0


def test_zeroshot_class_names_follow_a_labelled_folder(tmp_path, mesh):
  # Folders named after their classes, written out of order; labels are the sorted order.
  root = tmp_path / "val"
  for cls, folder in enumerate(("cat", "dog", "road_sign")):
    for j in range(2):
      _write_png(str(root / folder / f"{j}.png"), grey_image(cls))
  config = tiny_config()

  def top1(words, **fields):
    """Image of class c embeds as its word's prompt does: a hit iff the prompts are `words`."""
    text = np.eye(len(WORDS), dtype=np.float32)
    image = text[[WORDS.index(w) for w in words]]
    ev = zeroshot.ZeroShotEvaluator(config, KnownModel(image, text), mesh, batch_size=8,
                                    data=f"folder:{root}", templates=["{}"], **fields)
    return ev.tasks[""][1], ev.run({})["top1"]

  # Left out, the class names are the folder names, '_' read as a space.
  assert top1(["cat", "dog", "road"]) == (("cat", "dog", "road sign"), 1.0)
  # A mapping renames folders; the labels stay in sorted folder order.
  renamed = {"road_sign": "road", "dog": "house", "cat": "tree"}
  assert top1(["tree", "house", "road"], classnames=renamed) == (("tree", "house", "road"), 1.0)
  # A list must name every class; a mapping every folder and nothing else.
  with pytest.raises(ValueError, match=r"classnames has 2 names but .* has 3 classes"):
    top1(["cat", "dog", "road"], classnames=["cat", "dog"])
  with pytest.raises(ValueError, match=r"classnames: .*no name for 'road_sign'.*'bird'"):
    top1(["cat", "dog", "road"], classnames={"cat": "cat", "dog": "dog", "bird": "bird"})
  with pytest.raises(ValueError, match=r"classnames has 1000 names but .* has 3 classes"):
    top1(["cat", "dog", "road"], classnames="imagenet")


def test_zeroshot_class_names_of_tfds_and_wordnet_id_classes(tmp_path, mesh):
  pytest.importorskip("tensorflow_datasets")
  config, model = tiny_config(), KnownModel(np.eye(3), np.eye(3))

  def names(data, **fields):
    ev = zeroshot.ZeroShotEvaluator(config, model, mesh, data=data, batch_size=8, **fields)
    return ev.tasks[""][1]

  # ImageNet's labels are WordNet ids: the default is the ImageNet class names.
  assert names("tfds:imagenet2012:validation") == classnames.IMAGENET_CLASSNAMES
  with pytest.raises(ValueError, match=r"classnames has 100 names but .* has 10 classes"):
    names("tfds:cifar10:test", classnames="cifar100")
  # Ids and numbers are no words to prompt with: they need classnames.
  for folder, why in (("n01440764", "WordNet ids"), ("7", "numbers")):
    _write_png(str(tmp_path / folder / folder / "0.png"), grey_image(0))
    with pytest.raises(ValueError, match=f"classnames: .*are {why}"):
      names(f"folder:{tmp_path / folder}")
    assert names(f"folder:{tmp_path / folder}", classnames={folder: "cat"}) == ("cat",)


def test_retrieval_from_a_karpathy_json(tmp_path, mesh):
  images = []
  for i in range(6):
    split = "train" if i == 2 else "test"
    _write_png(str(tmp_path / "img" / f"{i}.jpg.png"), grey_image(i))
    images.append({"filename": f"{i}.jpg.png", "split": split,
                   "sentences": [{"raw": f"{WORDS[i]} {f}"} for f in FILLERS[:i % 3 + 1]]})
  (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
  config = tiny_config()
  eye = np.eye(6, dtype=np.float32)
  ev = retrieval.RetrievalEvaluator(
      config, KnownModel(eye, eye), mesh, batch_size=4,
      data=f"karpathy:{tmp_path / 'dataset_flickr30k.json'}?image_dir={tmp_path / 'img'}")
  metrics = ev.run({})
  assert metrics["num_images"] == 5 and metrics["num_captions"] == 1 + 2 + 1 + 2 + 3
  assert metrics["image_to_text_R@1"] == 1.0 and metrics["text_to_image_R@1"] == 1.0


def test_retrieval_from_webdataset_shards(tmp_path, mesh):
  """Any image-text source of the input pipeline: here a webdataset tar, via a spec."""
  shard = str(tmp_path / "val-000.tar")
  with tarfile.open(shard, "w") as tar:
    for i in range(5):
      for name, data in ((f"{i:03d}.png", _png(grey_image(i))),
                         (f"{i:03d}.txt", f"{WORDS[i]} {FILLERS[i]}".encode())):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  eye = np.eye(5, dtype=np.float32)
  ev = retrieval.RetrievalEvaluator(tiny_config(), KnownModel(eye, eye), mesh,
                                    data=f"wds:{shard}?text=txt", batch_size=4)
  metrics = ev.run({})
  assert metrics["num_images"] == 5 and metrics["num_captions"] == 5
  assert metrics["image_to_text_R@1"] == 1.0 and metrics["text_to_image_R@1"] == 1.0


# --- The tiny real model against plain loops over TFDS mock data -----------------------------


def _reference_images(ds, image_key, size):
  out = []
  for ex in ds:
    pixels = transforms.eval_image(Image.fromarray(ex[image_key].numpy()), size)
    out.append((pixels / 255.0 - transforms.CLIP_MEAN) / transforms.CLIP_STD)
  return np.stack(out).astype(np.float32)


def test_zeroshot_on_tfds_mock_cifar10_equals_a_plain_reference(tiny, mesh):
  tfds = pytest.importorskip("tensorflow_datasets")
  config, model, params = tiny
  ev = zeroshot.ZeroShotEvaluator(config, model, mesh, data="tfds:cifar10:test",
                                  classnames="cifar10", batch_size=8)
  with tfds.testing.mock_data(num_examples=13):
    metrics = ev.run(params)
    ds = tfds.load("cifar10", split="test")
    images = _reference_images(ds, "image", config.model.image_size)
    labels = np.array([int(ex["label"]) for ex in ds])
  zimg = np.asarray(model.apply({"params": params}, images, method="encode_image")[0])
  zcls = []
  for name in classnames.CIFAR10_CLASSNAMES:
    tokens = tokenizer.tokenize([t.format(name) for t in classnames.CIFAR_TEMPLATES],
                                config.model.context_length)
    z = np.asarray(model.apply({"params": params}, tokens, method="encode_text"))
    z = z.mean(axis=0)
    zcls.append(z / np.linalg.norm(z))
  scores = zimg @ np.stack(zcls).T
  top = np.argsort(-scores, axis=1)
  assert metrics["num_examples"] == 13
  assert metrics["top1"] == pytest.approx(np.mean(top[:, 0] == labels))
  assert metrics["top5"] == pytest.approx(np.mean((top[:, :5] == labels[:, None]).any(1)))


def test_retrieval_on_tfds_mock_coco_equals_a_plain_reference(tiny, mesh):
  tfds = pytest.importorskip("tensorflow_datasets")
  config, model, params = tiny
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (rng.integers(24, 48), rng.integers(24, 48), 3), np.uint8)
            for _ in range(11)]
  captions = [[" ".join(rng.choice(WORDS, 3)) for _ in range(rng.integers(1, 8))]
              for _ in range(11)]
  ev = retrieval.RetrievalEvaluator(config, model, mesh, data="tfds:coco_captions:test",
                                    batch_size=8, max_captions=5)
  with tfds.testing.mock_data(as_dataset_fn=_mock_coco(images, captions)):
    metrics = ev.run(params)
  size = config.model.image_size
  pixels = np.stack([transforms.eval_image(Image.fromarray(x), size) for x in images])
  x = ((pixels / 255.0 - transforms.CLIP_MEAN) / transforms.CLIP_STD).astype(np.float32)
  zimg = np.asarray(model.apply({"params": params}, x, method="encode_image")[0])
  kept = [c[:5] for c in captions]
  text_image = np.array([i for i, c in enumerate(kept) for _ in c])
  tokens = tokenizer.tokenize([t for c in kept for t in c], config.model.context_length)
  ztxt = np.asarray(model.apply({"params": params}, tokens, method="encode_text"))
  image_ranks, text_ranks = _reference_ranks(zimg, ztxt, text_image)
  assert metrics["num_images"] == 11 and metrics["num_captions"] == len(text_image)
  for k in (1, 5, 10):
    assert metrics[f"image_to_text_R@{k}"] == pytest.approx(np.mean(image_ranks < k))
    assert metrics[f"text_to_image_R@{k}"] == pytest.approx(np.mean(text_ranks < k))


# --- Linear probe ------------------------------------------------------------------------------


def test_linear_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(0, 4, (4, 16))
  def sample(n):
    y = rng.integers(0, 4, n)
    return (centres[y] + rng.normal(0, 1, (n, 16))).astype(np.float32), y
  (train_x, train_y), (test_x, test_y) = sample(400), sample(200)
  metrics = linear_probe.linear_probe(train_x, train_y, test_x, test_y, 4, max_iters=200)
  assert metrics["top1"] == 1.0 and metrics["val_top1"] == 1.0
  assert metrics["l2"] in linear_probe.DEFAULT_L2_GRID


def test_logistic_regression_reaches_the_scipy_optimum():
  optimize = pytest.importorskip("scipy.optimize")
  rng = np.random.default_rng(1)
  x = rng.normal(size=(120, 6)).astype(np.float32)
  y = rng.integers(0, 3, 120)  # not separable: a unique, finite optimum
  l2 = 1e-2

  def objective(flat):
    w, b = flat[:18].reshape(6, 3), flat[18:]
    logits = x.astype(np.float64) @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(w ** 2)

  ref = optimize.minimize(objective, np.zeros(21), method="L-BFGS-B",
                          options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 5000})
  params = linear_probe.fit_logistic_regression(x, y, 3, l2, max_iters=500)
  ours = np.concatenate([np.asarray(params["w"]).ravel(), np.asarray(params["b"])])
  assert objective(ours) == pytest.approx(ref.fun, rel=1e-5)
  np.testing.assert_allclose(ours, ref.x, atol=2e-3)


def test_linear_probe_evaluator_on_demo_data_counts_and_scores(tiny, mesh):
  config, model, params = tiny
  ev = linear_probe.LinearProbeEvaluator(config, model, mesh, num_train_examples=40,
                                        num_test_examples=21, batch_size=8, max_iters=30,
                                        features="patch_mean")
  metrics = ev.run(params)
  assert metrics["num_train"] == 40 and metrics["num_test"] == 21
  assert 0.0 <= metrics["top1"] <= 1.0 and metrics["num_bad_images"] == 0


# --- Registry ----------------------------------------------------------------------------------


def test_build_validates_names_types_and_modes(mesh):
  config = tiny_config()
  config.evals.zs = dict(type="zeroshot", every_steps=5, num_examples=8, batch_size=8)
  model = train_state.StateFactory(config, mesh).model
  [(name, every, ev)] = evaluators.build(config, model, mesh)
  assert (name, every) == ("zs", 5) and isinstance(ev, zeroshot.ZeroShotEvaluator)
  with pytest.raises(ValueError, match="not in config.evals"):
    evaluators.build(config, model, mesh, names=["nope"])
  config.evals.bad = dict(type="zero_shot")
  with pytest.raises(ValueError, match="unknown evaluator type 'zero_shot'"):
    evaluators.build(config, model, mesh)
  del config.evals["bad"]
  config.evals.zs.data = "tfds:test"
  with pytest.raises(ValueError, match=r"config.evals.zs: .*'tfds:NAME:SPLIT'"):
    evaluators.build(config, model, mesh)
  config.evals.zs.data = "tfds:cifar10:test"
  config.model.mode = "superclass"
  with pytest.raises(ValueError, match="needs a text tower"):
    evaluators.build(config, model, mesh)


def test_a_misspelt_field_is_an_error_naming_the_evaluator_and_the_field(mesh):
  config = tiny_config()
  config.evals.retrieval_coco = dict(type="retrieval", max_caption=3)
  model = KnownModel(np.eye(2), np.eye(2))
  with pytest.raises(ValueError, match=r"config.evals.retrieval_coco: RetrievalEvaluator has "
                     r"no field 'max_caption' \(did you mean 'max_captions'\?\); its fields: "
                     r"data, batch_size, max_captions, caption_index, num_examples, ks \(and type, "
                     r"every_steps\)"):
    evaluators.build(config, model, mesh)


def test_defaults_come_from_the_constructor_signature(mesh):
  config, model = tiny_config(), KnownModel(np.eye(2), np.eye(2))
  shared = dict(type="x", every_steps=3)  # read by evaluators.build, not the evaluator
  ev = common.from_config(retrieval.RetrievalEvaluator, shared, config, model, mesh)
  defaults = common.fields_of(retrieval.RetrievalEvaluator)
  assert (ev.data.spec, ev.batch_size, ev.num_examples, ev.ks) == (
      defaults["data"], defaults["batch_size"], defaults["num_examples"], defaults["ks"])
  ev = common.from_config(zeroshot.ZeroShotEvaluator, dict(shared, batch_size=16), config,
                          model, mesh)
  defaults = common.fields_of(zeroshot.ZeroShotEvaluator)
  assert (ev.text_batch_size, ev.ks) == (16, defaults["ks"])  # text_batch_size: batch_size
  ev = common.from_config(linear_probe.LinearProbeEvaluator, shared, config, model, mesh)
  defaults = common.fields_of(linear_probe.LinearProbeEvaluator)
  assert ev.probe_kwargs == {k: defaults[k] for k in ("l2_grid", "val_fraction", "max_iters",
                                                       "seed")}
  assert (ev.train_data.spec, ev.test_data.spec, ev.features) == (
      defaults["train_data"], defaults["test_data"], defaults["features"])


def test_old_dict_data_fields_read_as_the_spec_strings_they_stand_for():
  """Workdirs written before spec strings keep evaluating: each old form, by hand."""
  parse, LABELS, CAPTIONS = eval_data.parse, eval_data.LABELS, eval_data.CAPTIONS
  for old, new, needs in [
      (dict(source="demo"), "demo", LABELS),
      (dict(source="demo", split="retrieval"), "demo:retrieval", CAPTIONS),
      (dict(source="tfds", name="cifar10", split="test[:10%]", data_dir="/t"),
       "tfds:cifar10:test[:10%]?data_dir=/t", LABELS),
      (dict(source="tfds", name="coco_captions", split="val", captions_key="captions/text"),
       "tfds:coco_captions:val?text=captions/text", CAPTIONS),
      (dict(source="image_folder", path="/d/val"), "folder:/d/val", LABELS),
      (dict(source="karpathy_json", path="/d/c.json", image_dir="/d/img"),
       "karpathy:/d/c.json?image_dir=/d/img", CAPTIONS),
      (dict(source="spec", spec="wds:/d/{0..3}.tar?label=cls"), "wds:/d/{0..3}.tar?label=cls",
       LABELS)]:
    got, want = parse(old, needs), parse(new, needs)
    assert (got.kind, got.location, got.options) == (want.kind, want.location, want.options)


def test_eval_data_strings_are_checked_when_the_evaluator_is_built():
  parse, LABELS, CAPTIONS = eval_data.parse, eval_data.LABELS, eval_data.CAPTIONS
  assert parse("demo", LABELS).location == "zeroshot"
  assert parse("demo", CAPTIONS).location == "retrieval"
  karpathy = parse("karpathy:/d/dataset_coco.json?image_dir=/d/images", CAPTIONS)
  assert (karpathy.location, karpathy.options) == (
      "/d/dataset_coco.json", {"image_dir": "/d/images", "split": "test"})
  assert parse("tfds:cifar10:test[:10%]?data_dir=/t", LABELS).options == {"data_dir": "/t"}
  for data, needs, message in [
      (dict(source="nope", name="cifar10"), LABELS, "name it with a spec string"),
      (42, LABELS, "name it with a spec string"),
      ("demo:nope", LABELS, "split of"),
      ("karpathy:/d/dataset_coco.json", CAPTIONS, r"image_dir=DIR"),
      ("karpathy:/d/c.json?image_dir=/d", LABELS, "no class labels"),
      ("wds:/d/{0..3}.tar", LABELS, r"add \?label=FIELD"),
      ("folder:/d/val", CAPTIONS, "no captions"),
      ("imagenet", LABELS, "start it with one of"),
      ("tfds:cifar10:test?labl=x", LABELS, "unknown option")]:
    with pytest.raises(ValueError, match=message):
      parse(data, needs)
