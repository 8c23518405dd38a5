"""Every shipped config and documented variant builds, validates and lowers its train step
(abstract shapes, nothing compiled); the paper recipes ask for their data by name."""
import copy
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from superclip_jax import config_lib, sharding, train_state, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "wds:/nowhere/shards/{00000..00003}.tar"  # parsed by validate, never read here
EVAL_DATA = {"zeroshot_imagenet": "folder:/nowhere/imagenet/val",
             "retrieval_coco": "tfds:coco_captions:test"}
PAPER_FILES = ("b16", "l16", "clip_b16", "siglip_b16", "superclass_b16")
# Every documented variant: (config file, arg).
VARIANTS = ([("demo", ""), ("demo", "mode=clip"), ("demo", "contrastive=sigmoid"),
             ("demo", "long_captions=True"), ("demo", "mode=superclass,evals=probe")]
            + [(name, "") for name in PAPER_FILES]
            + [("b16", a) for a in ("mode=clip", "mode=superclass", "contrastive=sigmoid",
                                     "variant=L/16")]
            + [(name, f"platform={p}") for name in ("b16", "l16") for p in config_lib.PLATFORMS])

UNROLLED = {("demo", ""), ("b16", "")}  # lowered unrolled as shipped; the others scanned


def get_config(name, arg=""):
  return importlib.import_module(f"configs.{name}").get_config(arg or None)


def with_data(config):
  """The config with a dummy spec wherever a paper recipe leaves the user's data unset."""
  config = copy.deepcopy(config)
  if config.input.data == config_lib.NO_DATA:
    config.input.data = DATA
  for name, ev in config.evals.items():
    if ev.get("data") == config_lib.NO_DATA:
      ev.data = EVAL_DATA[name]
  return config


def label(name, arg):
  return f"{name}.py" + (f":{arg}" if arg else "")


def _unique_variants():
  """The variants, each distinct config once (siblings equal to a b16 variant: see below)."""
  seen, out = [], []
  for name, arg in VARIANTS:
    d = get_config(name, arg).to_dict()
    if d not in seen:
      seen.append(d)
      out.append(pytest.param(name, arg, id=label(name, arg)))
  return out


def lower_train_step(config, batch=2):
  """The jitted train step of `config` (as train.py jits it), lowered at `batch` examples."""
  config = copy.deepcopy(config)
  config.input.batch_size = batch
  mesh = sharding.make_mesh(config.mesh)
  factory = train_state.StateFactory(config, mesh)
  step = train_step.make_train_step(config, factory.model, factory.tx, factory.schedule, mesh)
  m = config.model
  shapes = {"image": ((batch, m.image_size, m.image_size, 3), jnp.float32),
            "tokens": ((batch, m.context_length), jnp.int32),
            "class_tokens": ((batch, m.context_length), jnp.int32)}
  abstract_batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
  jitted = jax.jit(step, in_shardings=(factory.shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(factory.shardings, sharding.replicated(mesh)),
                   donate_argnums=0)
  return factory, jitted.lower(factory.abstract, abstract_batch)


def test_every_config_file_is_covered():
  files = {f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
           if f.endswith(".py") and f != "__init__.py"}
  assert files == {name for name, _ in VARIANTS}


@pytest.mark.parametrize("sibling,b16_arg", [("clip_b16", "mode=clip"),
                                             ("siglip_b16", "contrastive=sigmoid"),
                                             ("superclass_b16", "mode=superclass"),
                                             ("l16", "variant=L/16")])
def test_sibling_configs_are_the_b16_variants_they_name(sibling, b16_arg):
  assert get_config(sibling).to_dict() == get_config("b16", b16_arg).to_dict()
  assert get_config(sibling, "platform=gpu-h100x8").to_dict() == get_config(
      "b16", f"{b16_arg},platform=gpu-h100x8").to_dict()


@pytest.mark.parametrize("name,arg", _unique_variants())
def test_shipped_config_validates_and_lowers_its_train_step(name, arg):
  config = with_data(get_config(name, arg))
  if config.model.attention == "cudnn":  # the GPU recipe: on this CPU, an error saying why
    with pytest.raises(ValueError, match="attention='cudnn' needs an NVIDIA GPU"):
      config_lib.validate(config)
    config.model.attention = "xla"
  config_lib.validate(config)
  if (name, arg) not in UNROLLED:  # unrolled towers are b16's and demo's; the rest (loss, head,
    config.model.scan_layers = True  # size, mesh, remat) lowers 2-3x faster scanned
  factory, lowered = lower_train_step(config)
  new_state, metrics = lowered.out_info
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(
      lambda a: (a.shape, a.dtype), factory.abstract)
  assert metrics["loss"].shape == () and "grad_norm" in metrics


def test_platform_variants_set_what_they_say():
  for name, settings in config_lib.PLATFORMS.items():
    c = get_config("l16", f"platform={name}")
    assert {k: c.model[k] for k in settings["model"]} == settings["model"]
    assert c.mesh.to_dict() == settings["mesh"]
    assert tuple(c.sharding_rules) == settings["sharding_rules"]
    assert c.model.variant == "L/16" and c.input.batch_size == 16_384
  readme = open(os.path.join(REPO, "README.md")).read()
  for name in config_lib.PLATFORMS:  # each variant is documented
    assert f"platform={name}" in readme


@pytest.mark.parametrize("name", PAPER_FILES)
def test_paper_config_without_data_stops_naming_the_flag(name):
  config = get_config(name)
  assert config.input.data == config_lib.NO_DATA
  with pytest.raises(ValueError, match=r"config\.input\.data is not set.*"
                     r"--config\.input\.data='wds:gs://BUCKET/shards/\{00000\.\.04095\}\.tar'"
                     r".*configs/demo\.py"):
    config_lib.validate(config)


def test_demo_is_the_only_config_with_built_in_data():
  assert get_config("demo").input.data == "demo"
  config_lib.validate(get_config("demo"))


def test_demo_probes_are_on_request_and_need_no_text_tower():
  assert not any("probe" in name for name in get_config("demo").evals)
  config = get_config("demo", "mode=superclass,evals=probe")
  assert sorted(config.evals) == ["probe_position", "probe_shape"]
  assert {ev.label for ev in config.evals.values()} == {"shape", "position"}
  config_lib.validate(config)
  both = get_config("demo", "mode=clip,evals=zeroshot+probe")
  assert sorted(both.evals) == ["probe_position", "probe_shape", "zeroshot"]


@pytest.mark.parametrize("arg,missing", [("", "retrieval_coco"),  # checked in name order
                                         ("evals=coco", "retrieval_coco"),
                                         ("evals=imagenet", "zeroshot_imagenet")])
def test_missing_eval_data_is_an_error_naming_the_field(arg, missing):
  config = get_config("b16", arg)
  config.input.data = DATA
  with pytest.raises(ValueError, match=rf"config\.evals\.{missing}\.data is not set.*"
                     rf"--config\.evals\.{missing}\.data=.*evals="):
    config_lib.validate(config)
  for name in config.evals:
    config.evals[name].data = EVAL_DATA[name]
  config_lib.validate(config)


def test_paper_evals_are_the_papers_and_valid_for_their_evaluators():
  from superclip_jax.evaluators import REGISTRY, common, eval_data, zeroshot
  assert sorted(get_config("b16").evals) == ["retrieval_coco", "zeroshot_imagenet"]
  assert sorted(get_config("b16", "evals=coco").evals) == ["retrieval_coco"]
  assert not get_config("b16", "evals=none").evals
  assert not get_config("superclass_b16").evals  # no text tower: no zero-shot or retrieval
  config = get_config("l16")
  for name, ev in config.evals.items():
    cls = REGISTRY[ev.type]
    assert set(ev) - set(common.SHARED_FIELDS) <= set(common.fields_of(cls)), name
    for example in config_lib.EVAL_DATA_EXAMPLES[name].split(" or "):
      needs = eval_data.LABELS if ev.type == "zeroshot" else eval_data.CAPTIONS
      eval_data.parse(example.split(" (")[0].strip("'"), needs)
  imagenet = config.evals.zeroshot_imagenet
  assert len(zeroshot.TEMPLATES[imagenet.templates]) == 80  # OpenCLIP's ImageNet templates
  assert "a bad photo of a {}." in zeroshot.TEMPLATES[imagenet.templates]


@pytest.mark.parametrize("arg,message", [("platform=tpu-v9", "platform='tpu-v9': use one of"),
                                         ("evals=imagenet+cifar", r"unknown \['cifar'\]")])
def test_an_unknown_variant_is_an_error_listing_the_known(arg, message):
  with pytest.raises(ValueError, match=message):
    get_config("b16", arg)
