"""Our zero-shot evaluator against LAION's clip_benchmark on one exported model and one data set.

The model is the demo's (configs/demo.py:mode=clip) with its image projection fitted by least
squares to the colour task's prompt embeddings: a linear probe in place of training, seconds
instead of minutes, and far from chance, so that a wrong class order, template or image
preprocessing changes the numbers. It is saved as a checkpoint and exported with
`python -m superclip_jax.export --format=openclip`. Held-out demo images, rendered larger than
the model's input and half of them not square (both sides resize and crop), are written as a
class folder and, with `tools/to_clip_benchmark`, in clip_benchmark's local webdataset layout.
`clip_benchmark eval` runs as a subprocess with downloads made impossible; our evaluator reads
the folder and the shards (docs/evaluation.md, "Cross-check with clip_benchmark").
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from superclip_jax import checkpoint, evaluate, sharding, tokenizer, train_state
from superclip_jax.data import demo, transforms
from superclip_jax.evaluators import eval_data
from tests import cpu_devices

if importlib.util.find_spec("clip_benchmark") is None:
  pytest.skip("clip_benchmark is not installed (pip install -e .[torch])",
              allow_module_level=True)
torch = pytest.importorskip("torch", reason="the torch extra is not installed")
open_clip = pytest.importorskip("open_clip", reason="the torch extra is not installed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES, TEMPLATES = demo.ZEROSHOT_TASKS["colour"]
NUM_FIT, NUM_EVAL, RENDER_SIZE = 256, 192, 64
# Anything that tries the network fails at once: HF offline, proxies at a closed port.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "ALL_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def demo_config():
  sys.path.insert(0, REPO)
  from configs import demo as demo_config_file
  c = demo_config_file.get_config("task=shapes,mode=clip")
  c.evals = {}
  return c


def fitted_state(config):
  """(train state, class embeddings [classes, embed]): the demo model's init with its image
  projection fitted so that each training image's embedding is its colour's prompt-ensemble
  embedding (ridge regression on the CLS features), and those prompt-ensemble embeddings."""
  factory = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
  state = factory.create()
  model, params = factory.model, jax.tree.map(np.asarray, state.params)
  fit = demo.batch(config.seed, "train", range(NUM_FIT), config.model.image_size)
  images = np.asarray(transforms.normalize(fit["image"]))
  cls_features = jax.jit(lambda p, x: model.apply(
      {"params": p}, x, method=lambda m, x: m.visual(x))[1][:, 0])
  x = np.asarray(cls_features(params, images), np.float64)  # [n, width] after ln_post
  tokens = tokenizer.tokenize([t.format(c) for c in CLASSES for t in TEMPLATES],
                              config.model.context_length)
  z = np.asarray(model.apply({"params": params}, tokens, method="encode_text"))
  z = z.reshape(len(CLASSES), len(TEMPLATES), -1).mean(axis=1)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  y = z[fit["colour"]]
  proj = np.linalg.solve(x.T @ x + 1e-3 * np.eye(x.shape[1]), x.T @ y)
  params["visual"]["proj"] = proj.astype(np.float32)
  return state.replace(step=jnp.int32(1), params=jax.tree.map(jnp.asarray, params)), z


def write_folder(root, config):
  """NUM_EVAL held-out demo images as root/<colour>/<i>.png; odd ones padded to 80x64."""
  for i in range(NUM_EVAL):
    ex = demo.example(config.seed, "zeroshot", i, RENDER_SIZE)
    image = ex["image"]
    if i % 2:
      image = np.pad(image, ((0, 0), (8, 8), (0, 0)), mode="edge")  # background, not square
    folder = root / CLASSES[ex["colour"]]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{i:04d}.png")


def start(command, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs)


def finish(proc: subprocess.Popen) -> str:
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, (proc.args, err[-3000:])
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Writes model, export, folder and layout; runs both evaluators. Returns what they gave."""
  tmp = tmp_path_factory.mktemp("cross_check")
  config = demo_config()
  workdir, export_dir = tmp / "workdir", tmp / "export"
  folder, layout = tmp / "images", tmp / "cb" / "colour"
  checkpoint.write_config(str(workdir), config)
  ckpt = checkpoint.Checkpointer(str(workdir), config)
  state, class_embeddings = fitted_state(config)
  ckpt.save(1, state)
  ckpt.close()
  write_folder(folder, config)

  env = cpu_devices.compile_cache(dict(os.environ, JAX_PLATFORMS="cpu"))
  export = start([sys.executable, "-m", "superclip_jax.export", f"--workdir={workdir}",
                  "--format=openclip", f"--out={export_dir}"], cwd=REPO, env=env)
  tool = start([sys.executable, "-m", "superclip_jax.tools.to_clip_benchmark",
                f"--data=folder:{folder}", f"--out={layout}",
                *(f"--templates={t}" for t in TEMPLATES)], cwd=REPO, env=env)
  finish(export)
  assert "wrote 192 images in 1 shard(s) (0 skipped), 6 classes, 3 templates" in finish(tool)

  result, classifier = tmp / "clip_benchmark.json", tmp / "classifier.pt"
  clip_benchmark = start(
      [sys.executable, "-m", "superclip_jax.tools.clip_benchmark_eval", "eval",
       "--model_type=open_clip", f"--model=local-dir:{export_dir}", "--pretrained=",
       "--dataset=wds/colour", f"--dataset_root={tmp / 'cb'}/{{dataset}}",
       "--task=zeroshot_classification", "--no_amp", "--batch_size=64", "--num_workers=0",
       f"--output={result}", f"--save_clf={classifier}"],
      cwd=tmp, env=dict(os.environ, **OFFLINE))
  config.evals = {  # meanwhile, ours on the folder and on the shards the tool wrote
      "zeroshot_folder": dict(type="zeroshot", data=f"folder:{folder}", templates=TEMPLATES,
                              batch_size=64),
      "zeroshot_shards": dict(type="zeroshot", data=f"wds:{layout}/test/{{0..0}}.tar?label=cls",
                              classnames=sorted(CLASSES), templates=TEMPLATES, batch_size=64),
  }
  ours = evaluate.evaluate(str(workdir), config)
  finish(clip_benchmark)
  return dict(config=config, export=export_dir, folder=folder, layout=layout,
              theirs=json.loads(result.read_text()), ours=ours, class_embeddings=class_embeddings,
              classifier=torch.load(classifier, weights_only=True).numpy())


def test_top1_agrees_with_clip_benchmark(run):
  theirs, ours = run["theirs"]["metrics"], run["ours"]
  print(f"clip_benchmark acc1 {theirs['acc1']:.4f} acc5 {theirs['acc5']:.4f}; ours (folder) "
        f"top1 {ours['zeroshot_folder/top1']:.4f} top5 {ours['zeroshot_folder/top5']:.4f}, "
        f"(shards) top1 {ours['zeroshot_shards/top1']:.4f}")
  assert ours["zeroshot_folder/num_examples"] == NUM_EVAL
  assert ours["zeroshot_folder/num_bad_images"] == 0
  assert theirs["acc1"] > 0.5  # chance is 1/6: the comparison can see a mistake
  assert abs(ours["zeroshot_folder/top1"] - theirs["acc1"]) <= 0.005
  assert abs(ours["zeroshot_folder/top5"] - theirs["acc5"]) <= 0.005
  # The shards the tool wrote are the folder's images, labels and prompts, to our reader too.
  for metric in ("top1", "top5", "num_examples"):
    assert ours[f"zeroshot_shards/{metric}"] == ours[f"zeroshot_folder/{metric}"]


def test_class_embeddings_agree(run):
  """clip_benchmark's zero-shot classifier (--save_clf, [embed, classes]) is our text tower's
  prompt ensemble: the same class names in the same order, templates, tokens and weights."""
  folder_order = sorted(CLASSES)  # a folder's labels; not demo.COLOUR_NAMES' order
  ours = run["class_embeddings"][[CLASSES.index(c) for c in folder_order]]
  theirs = run["classifier"].T
  assert ours.shape == theirs.shape == (len(CLASSES), 96)
  print(f"max |class embedding difference| {np.max(np.abs(theirs - ours)):.2e}")
  np.testing.assert_allclose(theirs, ours, atol=2e-5)
  assert (run["layout"] / "classnames.txt").read_text() == "".join(f"{c}\n" for c in folder_order)
  assert (run["layout"] / "zeroshot_classification_templates.txt").read_text() == "".join(
      t.replace("{}", "{c}") + "\n" for t in TEMPLATES)


def test_preprocessing_matches_openclip_from_the_export(run):
  """The images our evaluator scores are those the exported model's own preprocess makes."""
  _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run['export']}")
  data = eval_data.parse(f"folder:{run['folder']}", eval_data.LABELS)
  ours = np.concatenate([b["image"] for b in eval_data.classification_data(
      data, run["config"], 64).as_numpy_iterator()])
  files = sorted(run["folder"].glob("*/*.png"))
  theirs = np.stack([preprocess(Image.open(f)).numpy().transpose(1, 2, 0) for f in files])
  assert ours.shape == theirs.shape == (NUM_EVAL, 48, 48, 3)
  err = float(np.max(np.abs(ours - theirs)))
  print(f"max |ours - open_clip preprocess| {err:.2e}")
  assert err < 1e-5


def test_layout_reads_back_in_clip_benchmark(tmp_path):
  """clip_benchmark's own reader gives back the images (a BMP as lossless PNG, the others byte
  for byte), labels, class names and templates; an image that does not decode is left out."""
  from clip_benchmark.datasets.builder import build_wds_dataset
  from superclip_jax.tools import to_clip_benchmark
  rng = np.random.default_rng(0)
  pixels = [rng.integers(0, 256, (6, 5, 3), np.uint8) for _ in range(3)]
  encoded = []
  for p, fmt in zip(pixels, ("PNG", "BMP", "JPEG")):
    buffer = io.BytesIO()
    Image.fromarray(p).save(buffer, fmt)
    encoded.append(buffer.getvalue())
  images = [(encoded[0], 1), (b"not an image", 0), (encoded[1], 0), (encoded[2], 1)]
  out = tmp_path / "mine"
  counts = to_clip_benchmark.write_layout(images, ["cat", "hot dog"], ["a photo of a {}."],
                                          str(out), shard_size=2)
  assert counts == {"num_images": 3, "num_skipped": 1, "num_shards": 2}
  ds = build_wds_dataset("mine", transform=None, data_dir=str(out))
  assert ds.classes == ["cat", "hot dog"]
  assert [t.format(c="cat") for t in ds.templates] == ["a photo of a cat."]
  got = list(ds)
  assert [label for _, label in got] == [1, 0, 1]
  want = [pixels[0], pixels[1], np.asarray(Image.open(io.BytesIO(encoded[2])))]
  for (image, _), w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(image), w)
  with pytest.raises(ValueError, match="label 2, outside the 2 classes"):
    to_clip_benchmark.write_layout([(encoded[0], 2)], ["cat", "dog"], ["{}"], str(tmp_path / "x"))
