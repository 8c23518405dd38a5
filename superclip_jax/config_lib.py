"""Config building blocks shared by `configs/*.py`, and validation before anything compiles.

Config files stay the single source of truth: each defines `get_config(arg=None)` returning a
`ml_collections.ConfigDict`; `arg` is the text after ':' in `--config=file.py:key=value,...`.
Field names follow big_vision where it has one.
"""
from __future__ import annotations

import ast
import math

import ml_collections

from superclip_jax import attention, models
from superclip_jax.models import MODES, has_head

# Official SuperCLIP weight-decay exemptions: names containing ln / bn / bias / logit_scale
# (tensors with ndim < 2 are exempt regardless, see optim.weight_decay_mask).
DEFAULT_WD_MULTS = (
    (r".*(ln|bn)[^/]*/.*", 0.0),
    (r".*/bias", 0.0),
    (r"logit_(scale|bias)", 0.0),
    (r".*", 1.0),
)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'key=value,key2=value2' -> ConfigDict over `defaults`; values typed like the defaults.

  Unknown keys are an error that names them, so a typo never silently does nothing.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if "=" not in item:
      raise ValueError(f"Config arg {item!r} is not key=value (known keys: {sorted(defaults)})")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ValueError(f"Unknown config arg {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, (int, float)):
      out[key] = type(default)(ast.literal_eval(value))
    else:
      out[key] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults (the paper's B/16 recipe where it has one)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 31_250
  c.lr = 1e-3
  c.wd = 0.2
  c.wd_mults = DEFAULT_WD_MULTS
  c.frozen = ()  # regexes of parameter names kept fixed (e.g. LiT: ('visual/.*',))
  c.grad_clip_norm = 0.0  # 0 = off
  # Micro-batches per global batch (input.batch_size): gradient accumulation that keeps every
  # negative in the contrastive loss (superclip_jax/gradient_accumulation.py; docs/training.md).
  c.accum_steps = 1
  # (first, last) step to trace with jax.profiler into WORKDIR/profile (TensorBoard, Perfetto).
  c.profile_steps = ()
  c.optax = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98, eps=1e-6))
  c.schedule = ml_collections.ConfigDict(dict(warmup_steps=500, decay_type="cosine"))

  c.model = ml_collections.ConfigDict(dict(
      mode="superclip",  # 'superclip' | 'clip' (no head) | 'superclass' (head only)
      variant="B/16",
      image_size=224,
      context_length=77,
      vocab_size=49408,
      quick_gelu=False,
      patch_dropout=0.0,  # FLIP: fraction of patches dropped in training
      head_blocks=0,
      logit_scale_init=math.log(1 / 0.07),
      logit_bias=ml_collections.FieldReference(None, field_type=float),  # SigLIP only
      dtype="bfloat16",  # compute dtype; parameters are float32
      remat_policy="none",  # 'none' | 'full' | a jax.checkpoint_policies name
      scan_layers=False,  # one nn.scan over each tower's blocks: faster compiles, stacked params
      attention="auto",  # 'auto' | 'xla' | 'jax' | 'cudnn' (superclip_jax/attention.py)
  ))
  c.loss = ml_collections.ConfigDict(dict(
      contrastive="softmax",  # 'softmax' (CLIP) | 'sigmoid' (SigLIP)
      class_weight=1.0,  # lambda: total = contrastive + lambda * class
      use_idf=True,
  ))
  c.input = ml_collections.ConfigDict(dict(
      # One spec or a ';'-separated weighted mixture (docs/data.md): 'demo',
      # 'wds:/data/{00000..01023}.tar', 'tfrecord:PATTERN', 'tfds:NAME:SPLIT', 'folder:PATH',
      # options after '?': image=, text=, long_text=, label=, data_dir=, weight=.
      data="demo",
      batch_size=16_384,  # global
      shuffle_buffer=5000,  # records, per process
      cycle_length=8,  # shards read in parallel per process
      image_key="", text_key="", long_text_key="", label_key="",  # field names ('' = default)
      label_templates=("a photo of a {}.",),  # captions for label-only sources
      crop_scale=(0.9, 1.0),  # RandomResizedCrop scale
      skip_missing_shards=False,
      tfds_data_dir="",
      seed=ml_collections.FieldReference(None, field_type=int),  # default: config.seed
      threads=0,  # tf.data private threadpool (0 = TF's default)
      prefetch=2,
      max_consecutive_skips=10_000,  # a source skipping more records in a row stops the run
      stall_warning_seconds=300.0,  # no batch for this long: a warning naming stuck shards
      # Resuming with another number of processes: 'error', or 'restart' (file sources
      # re-read the shards some process had not finished; docs/data.md). The demo is exact.
      on_process_count_change="error",
      # The built-in demo data, rendered at model.image_size. long_captions_for_head: the
      # class head learns from the long caption (the paper's "dual" captions, Table 5).
      # caption: 'short' (the default) or 'long', the caption both losses learn from
      # (long_captions_for_head aside); the study's "long only" regime. templates: the
      # training split's short captions, '|'-separated, with the fields {size} {colour}
      # {shape} {pos} {bg} ('' = the built-in mix, data/demo.py); e.g. 'a shape in the {pos}'.
      # long_template: the long caption (training and the evals' long captions), one template
      # with those fields and {colour2} {shape2} {pos2} ('' = the built-in one, every field).
      demo=ml_collections.ConfigDict(dict(seed=0, long_captions_for_head=False,
                                          caption="short", templates="", long_template="")),
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding_rules = ((".*", "replicate"),)
  c.init_from = ""  # a PyTorch CLIP/SuperCLIP checkpoint (file or OpenCLIP directory)
  # The global batch an official SuperCLIP init_from checkpoint was trained at: its cap_fq /
  # num_samples statistics become exact IDF counts at that batch (0: input.batch_size).
  c.init_from_batch_size = 0
  c.nan_policy = "stop"  # 'stop' | 'skip': what a non-finite loss or gradient does
  # Checkpoints exist but none restores and verifies: False refuses to start; True moves them
  # to WORKDIR/unusable_checkpoints/ and starts again (init_from, or from scratch).
  c.ignore_unusable_checkpoints = False
  # 'skip' stops the run past this many skipped steps in any nonfinite_window steps.
  c.max_nonfinite_steps = 10
  c.nonfinite_window = 100

  # Multi-process runs agree every this many steps whether a preemption notice reached any
  # process (a host RPC, no device sync); a peer missing that check for
  # preemption_barrier_seconds is taken as dead (superclip_jax/preemption.py).
  c.preemption_check_steps = 1
  c.preemption_barrier_seconds = 600.0

  c.log_training_steps = 50
  c.ckpt_steps = 1000
  c.keep_ckpts = 3  # last K
  c.keep_ckpt_steps = 0  # plus every M-th step forever (0 = none)
  c.evals = ml_collections.ConfigDict()
  return c


# config.input.data and eval `data` fields of the paper recipes: the user's data, which
# `validate` asks for by name (only configs/demo.py has built-in data).
NO_DATA = ""
DATA_EXAMPLE = "--config.input.data='wds:gs://BUCKET/shards/{00000..04095}.tar'"

# The paper's evaluations (models with a text tower), chosen with the config arg
# `evals=imagenet+coco` (the default; 'none' for neither); each needs its `data` set.
PAPER_EVALS = {
    "imagenet": ("zeroshot_imagenet", dict(  # ImageNet-1k zero-shot, CLIP's 80 templates
        type="zeroshot", every_steps=2000, batch_size=1024, data=NO_DATA,
        templates="openai_imagenet")),
    "coco": ("retrieval_coco", dict(  # COCO 5k (Karpathy test split), 5 captions per image
        type="retrieval", every_steps=2000, batch_size=1024, data=NO_DATA)),
}
# What each eval's `data` may be set to, for the error that asks for it.
EVAL_DATA_EXAMPLES = {
    "zeroshot_imagenet": "folder:/data/imagenet/val (the ILSVRC2012 val folder) or "
                         "tfds:imagenet2012:validation",
    "retrieval_coco": "tfds:coco_captions:test or "
                      "'karpathy:/data/dataset_coco.json?image_dir=/data/coco'",
}

# Per-backend starting points for the paper recipes (`platform=` config arg): reasoned from
# the chips' memory, not measured here; time them with bench/bench_step.py before a long run.
PLATFORMS = {
    # 16 GiB HBM per chip: FSDP over every chip shards the float32 weights, gradients and AdamW
    # moments (16 bytes a parameter: 3.0 GB for SuperCLIP B/16, 7.7 GB for L/16 if replicated),
    # full remat keeps only each block's input, scan compiles one block per tower.
    "tpu-v5e-256": dict(model=dict(scan_layers=True, remat_policy="full"),
                        mesh=dict(data=1, fsdp=-1), sharding_rules=((".*", "fsdp"),)),
    # One 8-GPU node, 2,048 images per GPU: data parallel (the weights fit on every GPU, NVLink
    # all-reduces the gradients), cuDNN flash attention (an error, not a silent fallback, where
    # it cannot run), full remat for the activations, scan for compile time.
    "gpu-h100x8": dict(model=dict(scan_layers=True, remat_policy="full", attention="cudnn"),
                       mesh=dict(data=-1, fsdp=1), sharding_rules=((".*", "replicate"),)),
}
# Config args every paper config takes (besides its own mode/variant/contrastive).
PAPER_ARGS = dict(platform="", evals="imagenet+coco")


def paper_recipe(mode: str, variant: str, contrastive: str = "softmax", *,
                 platform: str = "", evals: str = PAPER_ARGS["evals"]):
  """The SuperCLIP paper's training recipe (superclip_vit_b16_s512m_bs16k).

  The data and the eval data are the user's: `config.input.data` and each paper eval's
  `data` start unset, and `validate` names them. platform: a PLATFORMS key ('' = none);
  evals: PAPER_EVALS keys joined by '+' ('none' or '' = no evals).
  """
  c = base_config()
  c.model.mode = mode
  c.model.variant = variant
  c.loss.contrastive = contrastive
  if contrastive == "sigmoid":  # OpenCLIP's SigLIP init: scale ln 10, bias -10
    c.model.logit_bias = -10.0
    c.model.logit_scale_init = math.log(10.0)
  c.input.data = NO_DATA
  c.input.batch_size = 16_384
  c.total_steps = 512_000_000 // c.input.batch_size  # 31,250
  c.log_training_steps = 50
  c.ckpt_steps = 1000
  _apply_platform(c, platform)
  chosen = chosen_evals(evals, PAPER_EVALS)
  if models.has_text(mode):  # zero-shot and retrieval embed text
    for key in chosen:
      name, fields = PAPER_EVALS[key]
      c.evals[name] = dict(fields)
  return c


def chosen_evals(evals: str, known) -> list[str]:
  """The config arg `evals=a+b` -> ['a', 'b'], each one of `known`; 'none' or '' -> []."""
  chosen = [e.strip() for e in evals.split("+") if e.strip()] if evals.strip() != "none" else []
  unknown = sorted(set(chosen) - set(known))
  if unknown:
    raise ValueError(f"Config arg evals={evals!r}: unknown {unknown}; use "
                     f"{'+'.join(known)}, a part of it, or 'none'")
  return chosen


def _apply_platform(c, platform: str) -> None:
  if not platform:
    return
  if platform not in PLATFORMS:
    raise ValueError(f"Config arg platform={platform!r}: use one of {sorted(PLATFORMS)} "
                     "(or leave it out for the plain recipe)")
  settings = PLATFORMS[platform]
  for key, value in settings["model"].items():
    c.model[key] = value
  for key, value in settings["mesh"].items():
    c.mesh[key] = value
  c.sharding_rules = settings["sharding_rules"]


def validate(config) -> None:
  """Checks a config before anything is built; every error says what to change."""
  m = config.model
  if m.mode not in MODES:
    raise ValueError(f"config.model.mode={m.mode!r}: use one of {MODES}")
  if config.loss.contrastive not in ("softmax", "sigmoid"):
    raise ValueError(f"config.loss.contrastive={config.loss.contrastive!r}: use 'softmax' or "
                     "'sigmoid'")
  if config.loss.contrastive == "sigmoid" and m.get("logit_bias") is None:
    raise ValueError("config.loss.contrastive='sigmoid' needs config.model.logit_bias "
                     "(e.g. -10.0, OpenCLIP's SigLIP init)")
  if not has_head(m.mode) and config.loss.class_weight and config.loss.class_weight != 1.0:
    raise ValueError("config.model.mode='clip' has no class head, so loss.class_weight is "
                     "unused; leave it at 1.0 or use mode='superclip'")
  for name in ("total_steps", "log_training_steps", "ckpt_steps"):
    if int(config[name]) <= 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]}")
  _check_data(config)
  check_evals(config)
  caption = config.input.get("demo", {}).get("caption", "short")
  if caption not in ("short", "long"):
    raise ValueError(f"config.input.demo.caption={caption!r}: use 'short' or 'long'")
  demo_config = config.input.get("demo", {})
  if demo_config.get("templates") or demo_config.get("long_template"):
    from superclip_jax.data import demo
    demo.parse_templates(demo_config.get("templates"))  # a bad one fails here, named
    demo.parse_long_template(demo_config.get("long_template"))
  from superclip_jax.data import position, spec  # data imports only when validating a run
  spec.mixture(config.input.data)  # a malformed data spec fails here, named
  if config.input.batch_size <= 0:
    raise ValueError(f"config.input.batch_size must be positive, got {config.input.batch_size}")
  accum = config.get("accum_steps", 1)
  if not isinstance(accum, int) or isinstance(accum, bool) or accum <= 0:
    raise ValueError(f"config.accum_steps must be a positive integer, got {accum!r}")
  if config.input.batch_size % accum:
    raise ValueError(f"config.input.batch_size={config.input.batch_size} must be divisible by "
                     f"config.accum_steps={accum} (the global batch is split into that many "
                     "micro-batches); change one of them")
  policy = config.input.get("on_process_count_change", "error")
  if policy not in position.PROCESS_COUNT_POLICIES:
    raise ValueError(f"config.input.on_process_count_change={policy!r}: use one of "
                     f"{position.PROCESS_COUNT_POLICIES}")
  profile = tuple(config.get("profile_steps", ()))
  if profile and (len(profile) != 2 or not all(isinstance(s, int) for s in profile)
                  or not 0 < profile[0] <= profile[1]):
    raise ValueError(f"config.profile_steps={profile!r}: use (first, last) steps with "
                     "0 < first <= last, e.g. (10, 15), or () for no trace")
  if config.nan_policy not in ("stop", "skip"):
    raise ValueError(f"config.nan_policy={config.nan_policy!r}: use 'stop' or 'skip'")
  _check_run_limits(config)
  if not 0.0 <= m.patch_dropout < 1.0:
    raise ValueError(f"config.model.patch_dropout={m.patch_dropout} must be in [0, 1)")
  models.check_remat_policy(m.get("remat_policy", "none"))  # unknown: an error listing all
  if not isinstance(m.get("scan_layers", False), bool):
    raise ValueError(f"config.model.scan_layers={m.scan_layers!r}: use True or False")
  if m.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.model.dtype={m.dtype!r}: use 'float32' or 'bfloat16'")
  _check_context_length(config)
  size, _ = models.parse_variant(m.variant)
  for tower in (models.VIT_SIZES[size], models.TEXT_SIZES.get(m.get("text_size") or size)):
    if tower is not None:  # 'cudnn' where it cannot run is an error saying why
      attention.resolve(m.get("attention", "auto"), m.dtype, tower.width // tower.heads)


def _check_data(config) -> None:
  data = config.input.data
  if data is None or (isinstance(data, str) and not data.strip()) or (
      not isinstance(data, str) and not len(data)):
    raise ValueError(f"config.input.data is not set: this recipe trains on your data; name it, "
                     f"e.g. {DATA_EXAMPLE} (webdataset shards; tfrecord:, tfds:, folder: and "
                     "mixtures in docs/data.md). configs/demo.py is the config with built-in "
                     "data.")


def check_evals(config, names=None) -> None:
  """Every eval in config.evals (or those in `names`) names its data; an unset `data`,
  `train_data` or `test_data` is an error naming the field and what to set it to."""
  for name, ev in config.get("evals", {}).items():
    if names is not None and name not in names:
      continue
    for field in ("data", "train_data", "test_data"):
      value = ev.get(field, "unused")
      if value is None or (isinstance(value, str) and not value.strip()):
        example = EVAL_DATA_EXAMPLES.get(name, "a spec string (docs/evaluation.md)")
        raise ValueError(
            f"config.evals.{name}.{field} is not set: this eval reads your copy of the data; "
            f"set it, e.g. --config.evals.{name}.{field}={example}, or leave the eval out "
            f"(paper configs: the config arg evals=, e.g. --config=configs/b16.py:evals=none; "
            "docs/evaluation.md)")


def eval_data_warnings(config, names=None, train_data: str | None = None) -> list[str]:
  """One line per eval (of `names`; default all) that reads the built-in demo data while
  training reads other data (`train_data`, default config.input.data): its numbers would be
  about the demo's shapes, not the data trained on. Shown at start-up, by training and by the
  evaluate command."""
  from superclip_jax.data import spec  # plain Python
  train_data = config.input.data if train_data is None else train_data
  try:
    if any(spec.parse_spec(s)[0] == "demo" for s, _ in spec.mixture(train_data)):
      return []
  except (ValueError, TypeError):
    return []  # validate() names what is wrong with the data
  from superclip_jax import evaluators  # the evaluators' defaults: TensorFlow, at start-up only
  lines = []
  for name, ev in config.get("evals", {}).items():
    if names is not None and name not in names:
      continue
    cls = evaluators.REGISTRY.get(ev.get("type", name))
    defaults = evaluators.common.fields_of(cls) if cls is not None else {}
    for field in ("data", "train_data", "test_data"):
      if field not in defaults:
        continue
      value = ev.get(field, defaults[field])
      if _is_demo_data(value):
        said = f"{value!r}" + ("" if field in ev else ", its default")
        lines.append(
            f"config.evals.{name}.{field} reads the built-in demo data ({said}) while "
            f"training reads {train_data!r}: its numbers are about the demo's shapes, "
            f"not your data. Set --config.evals.{name}.{field}=SPEC (e.g. 'folder:/data/test'; "
            "docs/evaluation.md) or drop the evals (--config=configs/demo.py:evals=none).")
  return lines


def _is_demo_data(value) -> bool:
  """Whether an eval data field names the built-in demo ('demo', 'demo:SPLIT', or the old
  dict(source='demo'))."""
  if isinstance(value, str):
    return value.strip().partition(":")[0].partition("?")[0] == "demo"
  return hasattr(value, "get") and value.get("source") == "demo"


# Numeric fields and the range each must lie in: (dotted field, low, high, low/high open?,
# why). Every one must also be finite: a NaN passes every comparison, and an lr or eps of NaN
# makes every update NaN.
NUMBER_RANGES = (
    ("lr", 0.0, math.inf, False, "0 keeps the weights fixed; a negative one climbs the loss"),
    ("wd", 0.0, math.inf, False, "decoupled weight decay, e.g. 0.2"),
    ("grad_clip_norm", 0.0, math.inf, False, "0 is off"),
    ("optax.b1", 0.0, 1.0, (False, True), "Adam's first-moment decay, e.g. 0.9"),
    ("optax.b2", 0.0, 1.0, (False, True), "Adam's second-moment decay, e.g. 0.98"),
    ("optax.eps", 0.0, math.inf, (True, False),
     "Adam divides by sqrt(nu) + eps: 0 makes a zero gradient 0/0; e.g. 1e-6"),
    ("schedule.warmup_steps", 0, math.inf, False, "steps of linear warm-up"),
    ("loss.class_weight", 0.0, math.inf, False, "lambda in contrastive + lambda * class"),
    ("model.logit_scale_init", -math.inf, math.inf, False, "ln of the initial logit scale"),
    ("model.logit_bias", -math.inf, math.inf, False, "SigLIP's initial bias, e.g. -10.0"),
    ("keep_ckpt_steps", 0, math.inf, False, "0 keeps none forever"),
    ("preemption_check_steps", 1, math.inf, False, "steps between preemption checks"),
    ("preemption_barrier_seconds", 0.0, math.inf, (True, False),
     "seconds before a silent peer counts as dead"),
    ("input.stall_warning_seconds", 0.0, math.inf, False, "0 never warns"),
)


def _check_numbers(config) -> None:
  """Every field of NUMBER_RANGES (where the config has it) is a finite number in its range;
  so are the wd_mults multipliers and input.crop_scale."""
  def fail(field, value, rule):
    raise ValueError(f"config.{field}={value!r}: {rule}")

  for field, low, high, open_, why in NUMBER_RANGES:
    node = config
    for key in field.split("."):
      node = node.get(key) if hasattr(node, "get") else None
    if node is None:  # not in this config (or an unset optional, as logit_bias for softmax)
      continue
    open_low, open_high = open_ if isinstance(open_, tuple) else (open_, open_)
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
      fail(field, node, f"use a finite number ({why})")
    if node < low or node > high or (open_low and node == low) or (open_high and node == high):
      if high == math.inf:
        bounds = f"{'>' if open_low else '>='} {low}"
      else:
        bounds = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
      fail(field, node, f"use a number {bounds} ({why})")
  for rule in config.get("wd_mults", ()):
    mult = rule[1] if len(rule) == 2 else None
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not (
        math.isfinite(mult) and mult >= 0):
      fail("wd_mults", rule, "each rule is (regex, multiplier) with a finite multiplier >= 0")
  scale = tuple(config.input.get("crop_scale", (0.9, 1.0)))
  if len(scale) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in scale
                                ) or not 0 < scale[0] <= scale[1] <= 1:
    fail("input.crop_scale", scale, "use (low, high) with 0 < low <= high <= 1, the fraction "
         "of the image a training crop covers, e.g. (0.9, 1.0)")


def _check_run_limits(config) -> None:
  _check_numbers(config)
  if int(config.keep_ckpts) < 1:
    raise ValueError(f"config.keep_ckpts={config.keep_ckpts} keeps no checkpoint, so a restart "
                     "would start from scratch; use 1 or more (keep_ckpt_steps adds kept ones)")
  limit, window = config.get("max_nonfinite_steps", 10), config.get("nonfinite_window", 100)
  if int(limit) < 0:
    raise ValueError(f"config.max_nonfinite_steps={limit}: use 0 or more (skipped steps "
                     "allowed in any config.nonfinite_window steps under nan_policy='skip')")
  if int(window) < 1:
    raise ValueError(f"config.nonfinite_window={window}: use 1 or more steps")


def _check_context_length(config) -> None:
  """Room for the start and end tokens, for every label template with a one-token name, and
  for the demo's long caption when its template is set."""
  context = config.model.context_length
  if not isinstance(context, int) or context < 3:
    raise ValueError(f"config.model.context_length={context!r}: use an integer of at least 3 "
                     "(start token, a word, end token); OpenCLIP's models use 77")
  from superclip_jax import tokenizer  # the BPE vocabulary loads only when validating a run
  from superclip_jax.data import spec
  templates = spec.check_templates(config.input.get("label_templates", spec.DEFAULT_TEMPLATES),
                                   "config.input.label_templates")
  for template in templates:
    needed = len(tokenizer.encode(template.format("x"))) + 2
    if needed > context:
      raise ValueError(f"config.model.context_length={context} is too short for the label "
                       f"template {template!r}: it needs {needed} tokens with a one-token class "
                       "name; raise context_length or shorten config.input.label_templates")
  long_template = config.input.get("demo", {}).get("long_template")
  if long_template:  # parsed above (validate)
    from superclip_jax.data import demo
    needed = demo.longest_long_caption(long_template, tokenizer.encode) + 2
    if needed > context:
      raise ValueError(
          f"config.model.context_length={context} is too short for "
          f"config.input.demo.long_template {long_template!r}: its longest caption needs "
          f"{needed} tokens; raise context_length or shorten the template")
