"""Exports proven numerically against the real PyTorch libraries, and imports proven bitwise.

Every format is loaded by the library that users will load it with (open_clip, transformers, a
rebuilt official SuperCLIP module) and must give the JAX model's image and text embeddings,
logits and class logits within 1e-5 relative, for a tiny model and for B/16 (random weights,
LayerNorms and logit_scale moved off their init so that a swapped scale/bias or a wrong
orientation shows). import(export(params)) must be params, bit for bit.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from superclip_jax import convert
from superclip_jax import export
from superclip_jax import export_dir
from superclip_jax import models
from superclip_jax import tokenizer
from superclip_jax import torch_configs
from superclip_jax import torch_io
from superclip_jax import torch_layouts

RTOL = 1e-5
SOT, EOT = 49406, 49407
MAX_ERRORS = collections.defaultdict(float)  # reported at the end of the run (-s)


def random_params(model, seed=0):
  """Random params of `model`'s shapes: kernels ~ N(0, 1/fan_in), LayerNorm scales 1 ± 0.2,
  biases, embeddings and positions ~ 0.1·N(0,1), logit_scale 3.3, logit_bias −7.5."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, s in convert.param_shapes(model).items():
    name = path[-1]
    if name == "logit_scale":
      x = np.float32(3.3)
    elif name == "logit_bias":
      x = np.float32(-7.5)
    elif name == "scale":
      x = 1 + 0.2 * rng.standard_normal(s.shape, np.float32)
    elif name == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      x = rng.standard_normal(s.shape, np.float32) * np.float32(fan_in ** -0.5)
    elif name in ("proj", "text_projection"):
      x = rng.standard_normal(s.shape, np.float32) * np.float32(s.shape[0] ** -0.5)
    else:  # biases, embeddings, positional and class embeddings
      x = 0.1 * rng.standard_normal(s.shape, np.float32)
    out[path] = np.asarray(x, np.float32)
  return traverse_util.unflatten_dict(out)


def make_inputs(model, batch=2, seed=1):
  """Images as the data pipeline gives them (NHWC, normalised); tokens SOT…EOT, 0-padded."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, model.image_size, model.image_size, 3), np.float32)
  tokens = np.zeros((batch, model.context_length), np.int32)
  for i, length in enumerate(rng.integers(3, model.context_length - 1, batch)):
    tokens[i, 0] = SOT
    tokens[i, 1:length] = rng.integers(1, SOT, length - 1)
    tokens[i, length] = EOT
  return images, tokens


def jax_reference(model, params, images, tokens):
  def run(p, x, t):
    v = {"params": p}
    out = model.apply(v, x, t)
    img, patch_mean = model.apply(v, x, method="encode_image", normalize=False)
    out["image_features"] = img
    out["text_features"] = model.apply(v, t, method="encode_text", normalize=False)
    out["logits"] = out["logit_scale"] * out["zimg"] @ out["ztxt"].T
    if "logit_bias" in out:
      out["logits"] = out["logits"] + out["logit_bias"]
    return out
  return jax.tree_util.tree_map(np.asarray, jax.jit(run)(params, images, tokens))


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def assert_close(name, got, want, case):
  err = rel_err(got, want)
  MAX_ERRORS[f"{case}:{name}"] = max(MAX_ERRORS[f"{case}:{name}"], err)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert err < RTOL, f"{name}: relative error {err:.2e}"


def assert_params_equal(got, want):
  got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert set(got) == set(want)
  for path in want:
    g, w = np.asarray(got[path]), np.asarray(want[path])
    assert g.dtype == w.dtype and g.shape == w.shape, path
    assert np.array_equal(g, w), f"{'/'.join(path)} differs"


class Case:
  def __init__(self, name, model, seed=0):
    self.name, self.model = name, model
    self.params = random_params(model, seed)
    self.images, self.tokens = make_inputs(model)
    self.ref = jax_reference(model, self.params, self.images, self.tokens)


def tiny(**kw):
  kw = {"variant": "mu/8", "image_size": 32, "head_blocks": 1, "dtype": jnp.float32, **kw}
  return models.SuperCLIP(**kw)


@pytest.fixture(scope="module")
def small():
  return Case("mu8", tiny())


@pytest.fixture(scope="module")
def b16():
  return Case("B16", models.SuperCLIP(variant="B/16", dtype=jnp.float32))


@pytest.fixture(params=["small", "b16"])
def case(request):
  return request.getfixturevalue(request.param)


@pytest.fixture(scope="module", autouse=True)
def report_errors():
  yield
  for key, err in sorted(MAX_ERRORS.items()):
    print(f"max relative error {key}: {err:.2e}")


def nchw(images):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def torch_tokens(tokens):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(tokens.astype(np.int64))


# ------------------------------------------------------------------------------------------
# OpenCLIP

def check_openclip_dir(out, case):
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
  model.eval()
  x, t = nchw(case.images), torch_tokens(case.tokens)
  with torch.no_grad():
    img = model.encode_image(x).numpy()
    txt = model.encode_text(t).numpy()
    outputs = model(x, t)
    logits = outputs[2] * outputs[0] @ outputs[1].T  # outputs[2] is exp(logit_scale)
    if len(outputs) == 4:
      logits = logits + outputs[3]
  assert_close("openclip image", img, case.ref["image_features"], case.name)
  assert_close("openclip text", txt, case.ref["text_features"], case.name)
  assert_close("openclip logits", logits.numpy(), case.ref["logits"], case.name)
  crop = [t for t in preprocess.transforms if type(t).__name__ == "CenterCrop"][0]
  assert tuple(np.atleast_1d(crop.size)) in ((case.model.image_size,),
                                             (case.model.image_size,) * 2)
  return model


def test_openclip_numerics(case, tmp_path):
  export.write_export(case.params, case.model, "openclip", tmp_path)
  cfg = json.loads((tmp_path / "open_clip_config.json").read_text())
  assert cfg["model_cfg"]["quick_gelu"] is False
  if case.name == "B16":  # exactly OpenCLIP's own ViT-B-16 config
    open_clip = pytest.importorskip("open_clip")
    assert cfg["model_cfg"] == {"quick_gelu": False, **open_clip.get_model_config("ViT-B-16")}
  check_openclip_dir(tmp_path, case)


def test_openclip_quickgelu(tmp_path):
  torch = pytest.importorskip("torch")
  case = Case("mu8-quickgelu", tiny(quick_gelu=True))
  export.write_export(case.params, case.model, "openclip", tmp_path)
  cfg = json.loads((tmp_path / "open_clip_config.json").read_text())
  assert cfg["model_cfg"]["quick_gelu"] is True
  check_openclip_dir(tmp_path, case)
  # The test can see the difference: the same weights with exact GELU are far off.
  open_clip = pytest.importorskip("open_clip")
  wrong = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}",
                                                quick_gelu=False)[0].eval()
  with torch.no_grad():
    img = wrong.encode_image(nchw(case.images)).numpy()
  assert rel_err(img, case.ref["image_features"]) > 1e-3


def test_openclip_siglip_logit_bias(tmp_path):
  case = Case("mu8-siglip", tiny(logit_bias=-10.0, mode="clip"))
  export.write_export(case.params, case.model, "openclip", tmp_path)
  model = check_openclip_dir(tmp_path, case)
  assert float(model.logit_bias.detach()) == pytest.approx(-7.5)


def test_openclip_bin_weights_only(small, tmp_path):
  torch = pytest.importorskip("torch")
  export.write_export(small.params, small.model, "openclip", tmp_path)
  sd = torch.load(tmp_path / "open_clip_pytorch_model.bin", weights_only=True)
  ref = convert.to_openclip(small.params, small.model)
  assert set(sd) == set(ref)
  for k, v in ref.items():
    assert np.array_equal(sd[k].numpy(), v), k


# ------------------------------------------------------------------------------------------
# The official SuperCLIP layout, rebuilt from its state-dict structure: OpenCLIP's
# CustomTextCLIP (text tower under `text.`, vision tower returning the patch tokens) plus the
# SuperClass/SuperCLIP head (residual MLPs `mlps.{i}.{c_norm,c_fc,c_proj}`, `ln_mlp`,
# `text_projection`) and the float64 buffers `cap_fq`, `num_samples`.

def official_superclip(model_cfg):
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  nn = torch.nn

  class Head(nn.Module):
    def __init__(self, width, layers, mlp_ratio, vocab_size, quick_gelu):
      super().__init__()
      act = open_clip.transformer.QuickGELU if quick_gelu else nn.GELU
      hidden = int(width * mlp_ratio)
      self.mlps = nn.ModuleList([nn.Sequential(collections.OrderedDict(
          c_norm=nn.LayerNorm(width), c_fc=nn.Linear(width, hidden), gelu=act(),
          c_proj=nn.Linear(hidden, width))) for _ in range(layers)])
      self.ln_mlp = nn.LayerNorm(width)
      self.text_projection = nn.Linear(width, vocab_size)

    def forward(self, x):
      for mlp in self.mlps:
        x = x + mlp(x)
      return self.text_projection(self.ln_mlp(x))

  class SuperCLIP(open_clip.CustomTextCLIP):
    def __init__(self, clstext_cfg, **cfg):
      super().__init__(**cfg)
      self.text_decoder = Head(cfg["vision_cfg"]["width"], clstext_cfg["layers"],
                               clstext_cfg["mlp_ratio"], clstext_cfg["vocab_size"],
                               cfg.get("quick_gelu", False))
      vocab = clstext_cfg["vocab_size"]
      self.register_buffer("cap_fq", torch.zeros([1, vocab], dtype=torch.float64))
      self.register_buffer("num_samples", torch.zeros([1, 1], dtype=torch.float64))

  return SuperCLIP(**model_cfg).eval()


def test_superclip_numerics(case, tmp_path):
  torch = pytest.importorskip("torch")
  export.write_export(case.params, case.model, "superclip", tmp_path, idf=None)
  (cfg_file,) = tmp_path.glob("SuperCLIP-*.json")
  model = official_superclip(json.loads(cfg_file.read_text()))
  model.load_state_dict(torch.load(tmp_path / "superclip_model.bin", weights_only=True),
                        strict=True)
  x, t = nchw(case.images), torch_tokens(case.tokens)
  with torch.no_grad():
    img, patches = model.visual(x)
    txt = model.encode_text(t)
    class_logits = model.text_decoder(patches.mean(dim=1))
    zimg = torch.nn.functional.normalize(img, dim=-1)
    ztxt = torch.nn.functional.normalize(txt, dim=-1)
    logits = model.logit_scale.exp() * zimg @ ztxt.T
  assert_close("superclip image", img.numpy(), case.ref["image_features"], case.name)
  assert_close("superclip text", txt.numpy(), case.ref["text_features"], case.name)
  assert_close("superclip logits", logits.numpy(), case.ref["logits"], case.name)
  assert_close("superclip class logits", class_logits.numpy(), case.ref["class_logits"],
               case.name)


def test_superclip_b16_layout(b16):
  """The official SuperCLIP-ViT-B-16 checkpoint: 308 keys, `text.*` tower, head, buffers."""
  sd = convert.to_superclip(b16.params, b16.model,
                            {"doc_freq": np.zeros(49408), "num_docs": 0.0}, 16384)
  assert len(sd) == 308
  assert sum(k.startswith("text.") for k in sd) == 5 + 12 * 12
  assert not any(k.startswith(("token_embedding", "transformer.", "ln_final")) for k in sd)
  shapes = {k: (v.shape, v.dtype) for k, v in sd.items()}
  assert shapes["text.token_embedding.weight"] == ((49408, 512), np.float32)
  assert shapes["text.positional_embedding"] == ((77, 512), np.float32)
  assert shapes["text.text_projection"] == ((512, 512), np.float32)
  assert shapes["text_decoder.ln_mlp.weight"] == ((768,), np.float32)
  assert shapes["text_decoder.ln_mlp.bias"] == ((768,), np.float32)
  assert shapes["text_decoder.text_projection.weight"] == ((49408, 768), np.float32)
  assert shapes["text_decoder.text_projection.bias"] == ((49408,), np.float32)
  assert shapes["cap_fq"] == ((1, 49408), np.float64)
  assert shapes["num_samples"] == ((1, 1), np.float64)
  assert shapes["visual.conv1.weight"] == ((768, 3, 16, 16), np.float32)
  assert shapes["logit_scale"] == ((), np.float32)
  cfg = torch_configs.superclip_model_cfg(b16.model)
  assert cfg["vision_cfg"]["output_tokens"] is True
  assert cfg["clstext_cfg"] == {"context_length": 77, "vocab_size": 49408, "layers": 0,
                                "mlp_ratio": 4}
  assert torch_configs.openclip_model_name(b16.model) == "ViT-B-16"
  if importlib.util.find_spec("open_clip"):
    official = official_superclip(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in official.items()} == {
        k: v.shape for k, v in sd.items()}


def test_superclip_idf_statistics():
  """cap_fq/num_samples continue the official loss with our IDF weights."""
  rng = np.random.default_rng(0)
  batch, steps, vocab = 64, 37, 49408
  num_docs = batch * steps
  doc_freq = rng.integers(0, num_docs + 1, vocab).astype(np.float64)
  doc_freq[[SOT, EOT]] = num_docs  # in every caption: weight 0
  bufs = convert.superclip_idf_buffers({"doc_freq": doc_freq, "num_docs": float(num_docs)},
                                       vocab, batch)
  assert bufs["cap_fq"].shape == (1, vocab) and bufs["cap_fq"].dtype == np.float64
  assert bufs["num_samples"].shape == (1, 1) and bufs["num_samples"].dtype == np.float64
  assert bufs["num_samples"][0, 0] == steps
  official = np.log((bufs["num_samples"] + 1 / batch) / (bufs["cap_fq"] + 1 / batch))[0]
  ours = np.log((num_docs + 1) / (doc_freq + 1))
  np.testing.assert_allclose(official, ours, rtol=1e-12, atol=1e-12)
  assert official[SOT] == 0 and official[EOT] == 0
  back = convert.idf_from_superclip(bufs, batch)  # batch a power of 2: exact
  assert np.array_equal(back["doc_freq"], doc_freq) and back["num_docs"] == num_docs
  with pytest.raises(ValueError, match="batch_size"):
    convert.superclip_idf_buffers({"doc_freq": doc_freq, "num_docs": 1.0}, vocab, None)


def test_superclip_idf_through_files(small, tmp_path):
  idf = {"doc_freq": np.arange(49408, dtype=np.float64), "num_docs": 1e6}
  export.write_export(small.params, small.model, "superclip", tmp_path, idf=idf, batch_size=64)
  got = convert.load_torch_idf(tmp_path, 64)
  assert np.array_equal(got["doc_freq"], idf["doc_freq"]) and got["num_docs"] == 1e6


def test_official_idf_statistics_become_exact_counts():
  """cap_fq/num_samples as the official code accumulates them (float64 running sums of the
  batch-mean multi-hot, one step at a time) give back the exact integer counts."""
  rng = np.random.default_rng(1)
  batch, steps, vocab = 48, 50, 49408  # 48: not a power of 2, so the sums round
  cap_fq, num_samples = np.zeros((1, vocab)), np.zeros((1, 1))
  doc_freq = np.zeros(vocab, np.int64)
  for _ in range(steps):
    multi_hot = np.zeros((batch, vocab))
    multi_hot[:, [SOT, EOT]] = 1
    multi_hot[np.arange(batch)[:, None], rng.integers(1, 3000, (batch, 8))] = 1
    cap_fq += multi_hot.mean(0, keepdims=True)
    num_samples += 1
    doc_freq += multi_hot.sum(0).astype(np.int64)
  sd = {"cap_fq": cap_fq, "num_samples": num_samples}
  got = convert.idf_counts_from_superclip(sd, batch)
  assert got["num_docs"] == batch * steps and got["doc_freq"].dtype == np.int64
  np.testing.assert_array_equal(got["doc_freq"], doc_freq)
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"ckpt\.pt: cap_fq\[0, \d+\] \(token \d+\) × 64 = .* not a whole "
                           r"number.*config\.init_from_batch_size"):
    convert.idf_counts_from_superclip(sd, 64, where="ckpt.pt")


# ------------------------------------------------------------------------------------------
# Hugging Face transformers

def test_hf_numerics(case, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  export.write_export(case.params, case.model, "hf", tmp_path)
  model, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  model.eval()
  x = nchw(case.images)
  # transformers' tokenizer pads with EOT, not 0: the pooled position must still be the first
  # EOT, where we pool.
  hf_tokens = case.tokens.copy()
  eot_pos = np.argmax(case.tokens, axis=1)
  for i, p in enumerate(eot_pos):
    hf_tokens[i, p:] = EOT
  t = torch_tokens(hf_tokens)
  with torch.no_grad():
    img = model.get_image_features(pixel_values=x).pooler_output
    text_out = model.text_model(input_ids=t)
    txt = model.get_text_features(input_ids=t).pooler_output
    out = model(input_ids=t, pixel_values=x)
    vision = model.vision_model(pixel_values=x)
  hidden = text_out.last_hidden_state.numpy()
  np.testing.assert_array_equal(text_out.pooler_output.numpy(),
                                hidden[np.arange(len(eot_pos)), eot_pos])
  assert_close("hf image", img.numpy(), case.ref["image_features"], case.name)
  assert_close("hf text", txt.numpy(), case.ref["text_features"], case.name)
  assert_close("hf logits", out.logits_per_image.numpy(), case.ref["logits"], case.name)

  # The head beside it: post_layernorm on the patch tokens, their mean, then the head.
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  head = load_file(tmp_path / torch_io.HF_HEAD_FILE)
  ln = model.vision_model.post_layernorm
  with torch.no_grad():
    x = ln(vision.last_hidden_state)[:, 1:].mean(dim=1)
    for i in range(case.model.head_blocks):
      p = f"text_decoder.mlps.{i}."
      y = torch.nn.functional.layer_norm(x, x.shape[-1:], head[p + "c_norm.weight"],
                                         head[p + "c_norm.bias"], 1e-5)
      y = torch.nn.functional.linear(y, head[p + "c_fc.weight"], head[p + "c_fc.bias"])
      y = torch.nn.functional.gelu(y)
      x = x + torch.nn.functional.linear(y, head[p + "c_proj.weight"], head[p + "c_proj.bias"])
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], head["text_decoder.ln_mlp.weight"],
                                       head["text_decoder.ln_mlp.bias"], 1e-5)
    class_logits = torch.nn.functional.linear(x, head["text_decoder.text_projection.weight"],
                                              head["text_decoder.text_projection.bias"])
  assert_close("hf class logits", class_logits.numpy(), case.ref["class_logits"], case.name)


def test_hf_tokenizer_and_processor(small, tmp_path):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  open_clip = pytest.importorskip("open_clip")
  export.write_export(small.params, small.model, "hf", tmp_path)
  tok = transformers.CLIPTokenizer.from_pretrained(tmp_path)
  assert len(tok) == 49408 and tok.bos_token_id == SOT and tok.eos_token_id == EOT
  texts = ["a photo of a cat", "Two dogs, playing in the SNOW!", "3.14 is π-ish; isn't it?",
           "a  diagram   of the\tsolar system", "naïve café über straße 東京"]
  ours = open_clip.tokenize(texts).numpy()
  theirs = tok(texts, padding="max_length", max_length=77, return_tensors="np")["input_ids"]
  for a, b in zip(ours, theirs):
    n = int(np.argmax(a)) + 1
    np.testing.assert_array_equal(a[:n], b[:n])
  image_processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
  assert image_processor.crop_size == {"height": 32, "width": 32}
  np.testing.assert_allclose(image_processor.image_mean, torch_configs.IMAGE_MEAN)


def test_hf_tokenizer_needs_the_documented_cleaning(small, tmp_path):
  """transformers' CLIPTokenizer skips OpenCLIP's ftfy + HTML unescaping: curly apostrophes,
  `&amp;` and mojibake tokenize differently; docs/export.md's one-line cleaning makes the ids
  equal OpenCLIP's (and ours)."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  open_clip = pytest.importorskip("open_clip")
  import ftfy  # pylint: disable=g-import-not-at-top
  import html  # pylint: disable=g-import-not-at-top
  export.write_export(small.params, small.model, "hf", tmp_path)
  tok = transformers.CLIPTokenizer.from_pretrained(tmp_path)
  texts = ["it\u2019s a dog &amp; a cat", "Tom &amp;amp; Jerry", "caf\u00c3\u00a9 au lait"]
  want = open_clip.tokenize(texts).numpy()
  np.testing.assert_array_equal(want, tokenizer.tokenize(texts, 77))

  def ids(inputs):
    return tok(inputs, padding="max_length", max_length=77, return_tensors="np")["input_ids"]

  def same(a, b):
    n = int(np.argmax(a)) + 1
    return np.array_equal(a[:n], b[:n])

  assert not any(same(a, b) for a, b in zip(want, ids(texts)))
  clean = [html.unescape(html.unescape(ftfy.fix_text(t))).strip() for t in texts]  # the docs'
  assert all(same(a, b) for a, b in zip(want, ids(clean)))


def test_superclip_export_without_torch_then_the_documented_bin_command(small, tmp_path,
                                                                       monkeypatch, caplog):
  """Without torch there is no superclip_model.bin (a warning says so); docs/export.md's
  command makes it from the .safetensors, and torch reads back the same tensors."""
  torch = pytest.importorskip("torch")
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    written = export.write_export(small.params, small.model, "superclip", tmp_path)
  names = {os.path.basename(p) for p in written}
  assert "superclip_model.safetensors" in names and "superclip_model.bin" not in names
  assert "no superclip_model.bin written" in caplog.text
  docs = (pathlib.Path(__file__).parent.parent / "docs" / "export.md").read_text()
  command = re.search(r"^python -c (\".*\") OUT$", docs, re.M).group(1)
  subprocess.run(f"{sys.executable} -c {command} {tmp_path}", shell=True, check=True,
                 timeout=120)
  got = torch.load(tmp_path / "superclip_model.bin", weights_only=True)
  want = torch_io.read_state_dict(tmp_path / "superclip_model.safetensors")
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k].numpy(), v)


def test_hf_rejects_logit_bias():
  with pytest.raises(ValueError, match="logit_bias"):
    convert.to_hf(random_params(tiny(logit_bias=-10.0)), tiny(logit_bias=-10.0))


# ------------------------------------------------------------------------------------------
# Import: bitwise round trips, the trainer's entry point, errors.

def test_from_torch_inverts_to_torch():
  """to_torch against numpy for every kind; from_torch(to_torch(x)) is x (for q/k/v, its
  third of in_proj) bit for bit, and fuse_qkv joins the thirds back into x."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((4, 12)).astype(np.float32)  # a fused in_proj kernel [in, 3 * out]
  b = rng.standard_normal(12).astype(np.float32)
  conv = rng.standard_normal((2, 2, 3, 8)).astype(np.float32)  # HWIO
  cases = {"copy": (w, w, w), "linear": (w, w.T, w),  # kind: (ours, torch's, back)
           "conv": (conv, conv.transpose(3, 2, 0, 1), conv)}
  for i, part in enumerate("qkv"):
    cases[part] = (w, w[:, 4 * i:4 * (i + 1)].T, w[:, 4 * i:4 * (i + 1)])
    cases[part + "_bias"] = (b, b[4 * i:4 * (i + 1)], b[4 * i:4 * (i + 1)])
  thirds = {}
  for kind, (x, torch_want, back_want) in cases.items():
    y = torch_layouts.to_torch(x, kind)
    assert np.array_equal(y, torch_want), kind
    thirds[kind] = torch_layouts.from_torch(y, kind)
    assert thirds[kind].dtype == x.dtype and np.array_equal(thirds[kind], back_want), kind
  assert np.array_equal(torch_layouts.fuse_qkv({k: thirds[k] for k in "qkv"}), w)
  assert np.array_equal(torch_layouts.fuse_qkv({k + "_bias": thirds[k + "_bias"]
                                                for k in "qkv"}), b)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_round_trip_in_memory(case, fmt):
  m, p = case.model, case.params
  if fmt == "openclip":
    got = convert.from_openclip(convert.to_openclip(p, m), m)
    assert "class_head" not in got
    got["class_head"] = p["class_head"]
  elif fmt == "superclip":
    got = convert.from_superclip(convert.to_superclip(p, m), m)
  else:
    sd = dict(convert.to_hf(p, m)[0], **convert.head_state_dict(p, m))
    got = convert.from_hf(sd, m)
  assert_params_equal(got, p)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_round_trip_through_files(small, fmt, tmp_path):
  """load_torch_checkpoint(dir) as config.init_from uses it; the head is kept from
  init_params only when the format has none."""
  export.write_export(small.params, small.model, fmt, tmp_path)
  init = random_params(small.model, seed=7)
  got = convert.load_torch_checkpoint(tmp_path, small.model, init)
  want = dict(small.params)
  if fmt == "openclip":
    want["class_head"] = init["class_head"]
  assert_params_equal(got, want)


def test_import_files_wrapper_prefix_and_bf16(small, tmp_path):
  torch = pytest.importorskip("torch")
  sd = convert.to_superclip(small.params, small.model)
  tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
  path = tmp_path / "epoch_3.pt"  # the official trainer's {'state_dict': …} with DDP prefix
  torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v
                                                         for k, v in tensors.items()}}, path)
  got = convert.load_torch_checkpoint(path, small.model, small.params)
  assert_params_equal(got, small.params)
  # A single safetensors file; bfloat16 tensors are widened to the init dtype (float32).
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  bf16 = {k: (v.bfloat16() if v.dtype == torch.float32 else v) for k, v in tensors.items()}
  save_file(bf16, str(tmp_path / "bf16.safetensors"))
  got = convert.load_torch_checkpoint(tmp_path / "bf16.safetensors", small.model, small.params)
  want = jax.tree_util.tree_map(
      lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), small.params)
  assert_params_equal(got, want)


def test_init_clip_checkpoint_into_superclip(small, tmp_path):
  """A pretrained CLIP (no head) starts SuperCLIP training: towers loaded, head kept new;
  and a SuperCLIP checkpoint loads into a CLIP model without its head."""
  clip_model = small.model.clone(mode="clip")
  clip_params = {k: v for k, v in small.params.items() if k != "class_head"}
  export.write_export(clip_params, clip_model, "openclip", tmp_path)
  init = random_params(small.model, seed=3)
  got = convert.load_torch_checkpoint(tmp_path / "open_clip_model.safetensors", small.model,
                                      init)
  assert_params_equal(got, {**clip_params, "class_head": init["class_head"]})
  got = convert.from_superclip(convert.to_superclip(small.params, small.model), clip_model)
  assert_params_equal(got, clip_params)


def test_import_shape_mismatch_names_parameter(small):
  sd = convert.to_openclip(small.params, small.model)
  sd["visual.ln_pre.weight"] = np.ones(65, np.float32)  # the sizes agree, one tensor does not
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"visual\.ln_pre\.weight is \(65,\).*visual/ln_pre/scale"):
    convert.from_openclip(sd, small.model)


def test_import_of_another_size_says_which_sizes(small, b16):
  """A B/16 file into a smaller model is a size mismatch naming the sizes (it used to say
  "unsupported architecture" about a block the smaller model lacks)."""
  sd = convert.to_openclip(small.params, small.model)
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"size mismatch: .*patch 8 \(model 16\)"):
    convert.from_openclip(sd, tiny(variant="mu/16"))
  wider = models.SuperCLIP(variant="demo/8", image_size=32, dtype=jnp.float32)
  with pytest.raises(convert.CheckpointMismatchError, match=r"size mismatch: .*vision_width 64"):
    convert.from_openclip(sd, wider)
  for fmt, to, read in (("openclip", convert.to_openclip, convert.from_openclip),
                        ("superclip", convert.to_superclip, convert.from_superclip),
                        ("hf", lambda p, m: convert.to_hf(p, m)[0], convert.from_hf)):
    big = to(b16.params, b16.model)
    with pytest.raises(convert.CheckpointMismatchError) as e:
      read(big, small.model)
    assert str(e.value).startswith("size mismatch: the checkpoint's vision_layers 12 (model 2), "
                                   "vision_width 768 (model 64), patch 16 (model 8), image_size "
                                   "224 (model 32), embed_dim 512 (model 32), text_layers 12 "
                                   "(model 2), text_width 512 (model 64)"), (fmt, str(e.value))


def test_truncated_or_empty_safetensors_name_the_file(small, tmp_path):
  export.write_export(small.params, small.model, "openclip", tmp_path / "oc")
  data = (tmp_path / "oc" / "open_clip_model.safetensors").read_bytes()
  (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) // 2])
  (tmp_path / "empty.safetensors").write_bytes(b"")
  for name in ("truncated", "empty"):
    path = tmp_path / f"{name}.safetensors"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} \(.* bytes\) is not a "
                                         r"readable \.safetensors file: .*truncated or damaged"):
      convert.load_torch_checkpoint(path, small.model, small.params)


def test_import_unsupported_architecture_names_parameter(small):
  sd = convert.to_openclip(small.params, small.model)
  sd["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones(64, np.float32)  # LayerScale
  with pytest.raises(convert.CheckpointMismatchError, match=r"resblocks\.0\.ls_1\.gamma"):
    convert.from_openclip(sd, small.model)
  with pytest.raises(convert.CheckpointMismatchError, match=r"visual\.trunk"):
    convert.detect_layout({"visual.trunk.patch_embed.proj.weight": np.zeros(1),
                           "token_embedding.weight": np.zeros(1)})
  sd = convert.to_openclip(small.params, small.model)
  del sd["ln_final.weight"]
  with pytest.raises(convert.CheckpointMismatchError, match=r"ln_final\.weight"):
    convert.from_openclip(sd, small.model)
  with pytest.raises(ValueError, match="superclass"):
    convert.to_openclip(small.params, small.model.clone(mode="superclass"))


def test_import_config_mismatch_names_field(small, tmp_path):
  export.write_export(small.params, small.model, "openclip", tmp_path)
  with pytest.raises(convert.CheckpointMismatchError, match="quick_gelu"):
    convert.load_torch_checkpoint(tmp_path, small.model.clone(quick_gelu=True), small.params)
  cfg = json.loads((tmp_path / "open_clip_config.json").read_text())
  cfg["model_cfg"]["text_cfg"]["pool_type"] = "last"
  (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
  with pytest.raises(export_dir.ExportManifestError, match="or, if you edited it on purpose"):
    convert.load_torch_checkpoint(tmp_path, small.model, small.params)
  (tmp_path / export_dir.MANIFEST).unlink()  # as the message says, for a deliberate edit
  with pytest.raises(convert.CheckpointMismatchError, match="text_cfg.pool_type"):
    convert.load_torch_checkpoint(tmp_path, small.model, small.params)
  export.write_export(small.params, small.model, "hf", tmp_path / "hf")
  with pytest.raises(convert.CheckpointMismatchError, match="hidden_act"):
    convert.load_torch_checkpoint(tmp_path / "hf", small.model.clone(quick_gelu=True),
                                  small.params)


def test_export_refuses_to_mix_formats(small, tmp_path):
  export.write_export(small.params, small.model, "openclip", tmp_path)
  export.write_export(small.params, small.model, "openclip", tmp_path)  # same format: replaced
  with pytest.raises(FileExistsError, match="open_clip"):
    export.write_export(small.params, small.model, "hf", tmp_path)


def test_without_torch(tmp_path):
  """safetensors export and import need no torch."""
  script = textwrap.dedent(f"""
      import sys
      sys.modules['torch'] = None  # any 'import torch' now fails
      import jax.numpy as jnp, numpy as np
      from superclip_jax import convert, export, models
      m = models.SuperCLIP(variant='mu/8', image_size=32, dtype=jnp.float32)
      shapes = convert.param_shapes(m)
      from flax import traverse_util
      p = traverse_util.unflatten_dict(
          {{k: np.full(s.shape, 0.5, s.dtype) for k, s in shapes.items()}})
      for fmt in ('openclip', 'superclip', 'hf'):
        files = export.write_export(p, m, fmt, '{tmp_path}/' + fmt)
        assert not any(f.endswith('.bin') for f in files), files
        q = convert.load_torch_checkpoint('{tmp_path}/' + fmt, m, p)
      print('ok')
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent.parent, timeout=120)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_cli_end_to_end(tmp_path):
  """`python -m superclip_jax.export` on a real training workdir (orbax checkpoint)."""
  # pylint: disable-next=g-import-not-at-top
  from superclip_jax import checkpoint, config_lib, sharding, train_state
  config = config_lib.base_config()
  config.model.update(variant="mu/8", image_size=32, head_blocks=1, dtype="float32")
  config.input.batch_size = 8
  model = models.model_from_config(config.model)
  params = random_params(model, seed=5)
  state = train_state.StateFactory(config, sharding.make_mesh(config.mesh)).create(params)
  multi_hot = np.zeros((8, 49408), np.float32)
  multi_hot[:, [SOT, EOT, 320]] = 1
  multi_hot[:3, 1000] = 1
  state = state.replace(idf=state.idf.update(jnp.asarray(multi_hot)))
  workdir = tmp_path / "workdir"
  checkpoint.write_config(str(workdir), config)
  ckpt = checkpoint.Checkpointer(str(workdir), config)
  ckpt.save(5, state)
  ckpt.close()

  out = tmp_path / "export"
  result = subprocess.run(
      [sys.executable, "-m", "superclip_jax.export", f"--workdir={workdir}", "--step=5",
       "--format=superclip", f"--out={out}"],
      capture_output=True, text=True, cwd=pathlib.Path(__file__).parent.parent, timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (out / "SuperCLIP-ViT-mu-8-32.json").is_file()
  assert_params_equal(convert.load_torch_checkpoint(out, model, params), params)
  idf = convert.load_torch_idf(out, config.input.batch_size)
  assert idf["num_docs"] == 8 and idf["doc_freq"][1000] == 3 and idf["doc_freq"][EOT] == 8
