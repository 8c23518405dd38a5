"""The inference API, the predict command and standalone evaluation, on a tiny checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from superclip_jax import checkpoint, evaluate, inference, predict, sharding, tokenizer
from superclip_jax import train_state
from tests import cpu_devices
from tests.test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 7


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, config, flax module, params): a tiny SuperCLIP saved at step 7."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config()
  config.evals.zeroshot = dict(type="zeroshot", num_examples=10, batch_size=8)
  factory = train_state.StateFactory(config, sharding.make_mesh(config.mesh))
  state = factory.create().replace(step=jnp.int32(STEP))
  checkpoint.write_config(workdir, config)
  ckpt = checkpoint.Checkpointer(workdir, config)
  ckpt.save(STEP, state)
  ckpt.close()
  return workdir, config, factory.model, jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def model(run):
  return inference.load(run[0], max_batch=4)


def _images(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def test_load_restores_the_checkpoint(run, model):
  assert model.step == STEP and model.mode == "superclip"
  assert model.image_size == 32 and model.context_length == 12
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), run[3])


def test_encoders_equal_the_model_in_any_batch_size_and_are_normalised(run, model):
  _, _, module, params = run
  x = _images(7)  # max_batch 4: chunks of 4 and 3, the 3 padded to 4
  ref = np.asarray(module.apply({"params": params}, x, method="encode_image")[0])
  z = model.encode_image(x)
  np.testing.assert_allclose(z, ref, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
  raw = model.encode_image(x, normalize=False)
  np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), z, atol=2e-5)

  tokens = model.tokenize(["a cat", "a dog", "a photo of a red circle", ""])
  ref = np.asarray(module.apply({"params": params}, tokens, method="encode_text"))
  np.testing.assert_allclose(model.encode_text(tokens), ref, atol=2e-5)


def test_inputs_are_checked_with_helpful_messages(model):
  with pytest.raises(ValueError, match="preprocess"):
    model.encode_image(np.zeros((1, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"\[batch, 32, 32, 3\]"):
    model.encode_image(np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match=r"int \[batch, 12\]"):
    model.encode_text(np.zeros((1, 77), np.int32))
  with pytest.raises(ValueError, match="decoded uint8"):
    model.preprocess(np.zeros((10, 10, 3), np.float32))


def test_class_logits_equal_the_head_and_tags_skip_special_ids(run, model):
  _, config, module, params = run
  x = _images(3, seed=1)
  patch_mean = module.apply({"params": params}, x, method="encode_image")[1]
  ref = np.asarray(module.apply({"params": params}, patch_mean, method="classify"))
  np.testing.assert_allclose(model.class_logits(x), ref, atol=1e-4)

  # A head whose bias makes SOT, EOT and padding the likeliest, then 'dog', then 'cat'.
  dog, cat = tokenizer.encode("dog")[0], tokenizer.encode("cat")[0]
  bias = np.zeros(config.model.vocab_size, np.float32)
  bias[[tokenizer.SOT_ID, tokenizer.EOT_ID, tokenizer.PAD_ID]] = 100.0
  bias[dog], bias[cat] = 60.0, 50.0  # far beyond the random logits (std ~1)
  biased = jax.tree.map(lambda a: a, params)
  biased["class_head"]["dense"]["bias"] = bias
  tagger = inference.Model(config, biased)
  tags = tagger.tags(x, k=3)
  assert len(tags) == 3
  all_logits = tagger.class_logits(x).astype(np.float64)
  for row, logits in zip(tags, all_logits):
    assert [t.token_id for t in row[:2]] == [dog, cat]
    assert [t.name for t in row[:2]] == ["dog", "cat"]
    assert not {t.token_id for t in row} & set(inference.SPECIAL_IDS)
    assert row[0].score > row[1].score > row[2].score > 0
    # Probabilities of the softmax over the vocabulary without the special ids.
    logits[list(inference.SPECIAL_IDS)] = -np.inf
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert [t.score for t in row] == pytest.approx([p[t.token_id] for t in row], rel=1e-4)


def test_preprocess_equals_openclip_eval_transform(model):
  open_clip = pytest.importorskip("open_clip")
  transform = open_clip.image_transform(32, is_train=False)
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (45, 70, 3), np.uint8)
  for pixels in (rgb, rgb[:, :, 0], np.concatenate([rgb, rgb[..., :1]], axis=-1)):
    ours = model.preprocess(pixels)
    ref = transform(Image.fromarray(pixels)).numpy().transpose(1, 2, 0)
    assert ours.shape == (32, 32, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_zero_shot_probabilities_are_a_softmax_over_the_labels(model):
  x = _images(2, seed=2)
  labels = ["a cat", "a dog", "a red circle"]
  probs = model.zero_shot(x, labels)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
  logits = model.logit_scale * model.encode_image(x) @ model.encode_text(
      model.tokenize(labels)).T
  ref = np.exp(logits - logits.max(axis=1, keepdims=True))
  np.testing.assert_allclose(probs, ref / ref.sum(axis=1, keepdims=True), atol=1e-5)
  # A prompt ensemble: per label, the normalised mean of its prompts' embeddings.
  z = model.class_embeddings(["cat"], ["a {}", "a photo of a {}"])
  both = model.encode_text(model.tokenize(["a cat", "a photo of a cat"])).mean(axis=0)
  np.testing.assert_allclose(z[0], both / np.linalg.norm(both), atol=1e-5)


def test_models_without_a_head_or_a_text_tower_say_so(run):
  _, config, _, params = run
  clip_config = tiny_config("clip")
  with pytest.raises(ValueError, match="no class head"):
    inference.Model(clip_config, params).tags(_images(1))
  with pytest.raises(ValueError, match="no text tower"):
    inference.Model(tiny_config("superclass"), params).encode_text(np.zeros((1, 12), np.int32))


def test_predict_reports_labels_and_tags(tmp_path, model):
  path = str(tmp_path / "img.png")
  Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 50, 3), np.uint8)).save(path)
  report = predict.predict(model, [path], ["a cat", "a dog"], top_k=4)
  lines = report.splitlines()
  assert lines[0] == path and "zero-shot (softmax over labels):" in lines[1]
  shown = dict(line.strip().split("  ", 1)[::-1] for line in lines[2:4])
  assert set(shown) == {"a cat", "a dog"}
  assert sum(float(p) for p in shown.values()) == pytest.approx(1.0, abs=2e-4)
  assert "tags (class head, top 4):" in lines[4] and len(lines) == 9
  with pytest.raises(FileNotFoundError, match="missing.png"):
    predict.read_image(str(tmp_path / "missing.png"))


def test_predict_reports_a_bad_image_and_goes_on(tmp_path, model):
  """One unreadable or missing image among several: reported in its place, the others get
  the same output as when predicted alone."""
  good = str(tmp_path / "good.png")
  Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 50, 3), np.uint8)).save(good)
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 not a jpeg")
  missing = str(tmp_path / "missing.png")
  report, failed = predict.predict_and_count(model, [str(bad), good, missing], ["a cat", "a dog"],
                                             top_k=3)
  alone = predict.predict(model, [good], ["a cat", "a dog"], top_k=3)
  lines = report.splitlines()
  assert failed == 2
  assert lines[0] == str(bad) and lines[1].startswith("  error: ")
  assert lines[-2:] == [missing, f"  error: FileNotFoundError: --image {missing!r} does not exist"]
  assert "\n".join(lines[2:-2]) == alone


def test_standalone_evaluate_logs_like_training(run, capsys):
  workdir = run[0]
  results = evaluate.evaluate(workdir)
  assert results["zeroshot/num_examples"] == 10
  out = capsys.readouterr().out
  assert f"step {STEP}/" in out and "zeroshot/colour_top1" in out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert records[-1]["step"] == STEP
  assert records[-1]["zeroshot/colour_top1"] == results["zeroshot/colour_top1"]
  assert "zeroshot/seconds" in records[-1]

  other = tiny_config()
  other.model.variant = "mu/16"
  with pytest.raises(ValueError, match=r"model.variant='mu/16' \(checkpoint: 'mu/8'\)"):
    evaluate.evaluate(workdir, other)


def test_evaluate_warns_when_the_run_left_the_demo_but_its_eval_did_not(run, tmp_path, capsys):
  """A run trained on its own shards whose config still evaluates on the demo: the evaluate
  command says so (as training does at start-up), naming the eval and the fix."""
  workdir = str(tmp_path / "own")
  shutil.copytree(run[0], workdir)
  saved = checkpoint.read_config(workdir)
  saved.input.data = "wds:/data/shards/{000..009}.tar"
  checkpoint.write_config(workdir, saved)
  evaluate.evaluate(workdir, names=["zeroshot"])
  warnings = [line for line in capsys.readouterr().out.splitlines()
              if line.startswith("Warning: ")]
  assert len(warnings) == 1, warnings
  assert "config.evals.zeroshot.data reads the built-in demo data" in warnings[0]
  assert "'wds:/data/shards/{000..009}.tar'" in warnings[0]
  evaluate.evaluate(run[0], names=["zeroshot"])  # trained on the demo: nothing to warn about
  assert "Warning: " not in capsys.readouterr().out


def test_command_lines_run(run, tmp_path):
  """`python -m superclip_jax.predict` and `python -m superclip_jax.evaluate`, end to end."""
  workdir = run[0]
  path = str(tmp_path / "img.jpg")
  Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(path)
  env = cpu_devices.compile_cache({**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  commands = [
      [sys.executable, "-m", "superclip_jax.predict", f"--workdir={workdir}", f"--image={path}",
       "--labels=a cat,a dog", "--top_k=3"],
      [sys.executable, "-m", "superclip_jax.evaluate", f"--workdir={workdir}",
       f"--step={STEP}", "--evals=zeroshot"],
  ]
  procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in commands]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  assert path in outs[0] and "a cat" in outs[0] and "tags (class head, top 3)" in outs[0]
  assert f"step {STEP}/" in outs[1] and "zeroshot/shape_top1" in outs[1]
