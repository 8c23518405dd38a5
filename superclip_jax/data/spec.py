"""How a config names its data: spec strings, weighted mixtures, field names, config.input's
defaults. Plain Python (no TensorFlow), so configs are checked without building a pipeline.

Spec strings (`config.input.data`, or each entry of a mixture):
  wds:PATTERN       webdataset tar shards, local or gs://: `wds:gs://b/laion/{00000..01023}.tar`
  tfrecord:PATTERN  img2dataset TFRecord shards (features `jpg`, `txt`, `key`)
  tfds:NAME:SPLIT   a TFDS dataset: `tfds:coco_captions:train`, `tfds:imagenet2012:validation`,
                    `tfds:cifar10:train[:90%]`
  folder:PATH       an image-folder tree, one subfolder per class (the ILSVRC val layout)
  demo              the built-in demo data (`demo.py`); not mixable
A PATTERN ending in `.tar` or `.tfrecord` may leave out its kind. Braces expand
(`{000..099}`, `{a,b}`) and `*` globs. Options after `?` override config.input's field names
for this source only: `wds:/d/{0..9}.tar?text=json/caption&long_text=long.txt`
(keys: image, text, long_text, label, data_dir). A mixture joins specs with ';', each with an
optional `?weight=W`.

Fields name where a record's parts are:
  webdataset  a member extension (`jpg`, `txt`, `long.txt`, `cls`) or a path into the JSON
              member (`json/caption`, `json/captions`); the image defaults to the first of
              jpg/jpeg/png/webp present.
  TFRecord    a feature name (`jpg`, `txt`).
  TFDS        a feature path (`image`, `captions/text`, `label`).
A field holding several strings (a list in JSON, a tfds Sequence) offers several captions; one
is chosen per example. Without a text field, a labelled source (tfds ClassLabel, a folder's
class) gets captions from `label_templates` and the class names.
"""
from __future__ import annotations

import dataclasses
import re
import string
import urllib.parse

from superclip_jax.data import transforms

KINDS = ("wds", "tfrecord", "tfds", "folder")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def check_templates(templates, field: str) -> tuple[str, ...]:
  """`templates` as a tuple of `str.format` patterns, each with one '{}' (or '{0}', as often
  as it likes) for the class name and no other field; anything else is a ValueError naming
  `field`. Every
  command that turns names into prompts checks here: a template without '{}' gives every
  class the same text, and '{name}' or '{0} {1}' fail only when formatted."""
  templates = (templates,) if isinstance(templates, str) else tuple(templates)
  if not templates:
    raise ValueError(f"{field} is empty: give at least one template, e.g. 'a photo of a {{}}.'")
  for template in templates:
    try:
      names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
      template.format("x")
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
      raise ValueError(f"{field}: template {template!r} is not a format pattern with one '{{}}' "
                       f"for the class name ({type(e).__name__}: {e}); write braces that are "
                       "text as '{{' and '}}'") from None
    if not names or any(name not in ("", "0") for name in names):
      raise ValueError(f"{field}: template {template!r} has no '{{}}' for the class name, so "
                       "every class would get the same text; e.g. 'a photo of a {}.'")
  return templates

# config.input fields the data modules read, with the defaults used when a config lacks them.
DEFAULTS = dict(
    shuffle_buffer=5000,  # records per process and source shuffled together
    cycle_length=8,  # shards read at once per process and source (a position group)
    image_key="",  # '' = the source's default (wds: jpg/jpeg/png/webp; tfrecord: jpg)
    text_key="",  # '' = 'txt' for shards; TFDS needs one unless it has a label
    long_text_key="",  # dual captions: the class head's caption ('' = the same caption)
    label_key="",  # TFDS label feature; label-only sources caption with label_templates
    label_templates=DEFAULT_TEMPLATES,
    crop_scale=transforms.TRAIN_SCALE,
    skip_missing_shards=False,
    tfds_data_dir="",
    seed=None,  # None: config.seed
    threads=0,  # tf.data private thread pool per pipeline; 0 = TensorFlow's default
    prefetch=2,  # batches
    # Records in a row a source may skip (bad_records) before the run stops, naming it: a
    # source with nothing usable would otherwise be read forever. 0: no limit.
    max_consecutive_skips=10_000,
    # No batch for this long logs a warning naming the shards that give no record (0: never).
    stall_warning_seconds=300.0,
    # A resumed run with another number of processes than the one that saved the data
    # position: 'error', or 'restart' file sources where some process had not finished
    # (re-reads, never skips; position.resume_position, docs/data.md). The demo resumes exactly.
    on_process_count_change="error",
)


def input_field(config, name):
  """config.input.<name>, or its default when the config lacks it (or holds None)."""
  value = config.input.get(name, None)
  return DEFAULTS[name] if value is None else value


@dataclasses.dataclass(frozen=True)
class Fields:
  """Where a record's parts are in a source ('' = the source's default / none)."""
  image: str = ""
  text: str = ""
  long_text: str = ""
  label: str = ""
  label_templates: tuple[str, ...] = DEFAULT_TEMPLATES


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
  """'kind:location?k=v&...' -> (kind, location, options). Raises ValueError naming the spec."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"data spec {spec!r} is empty; use e.g. 'wds:/data/{{00000..00099}}.tar'")
  spec = spec.strip()
  if spec == "demo":
    return "demo", "", {}
  kind, sep, rest = spec.partition(":")
  if not sep or kind not in KINDS:
    if re.search(r"\.tar(\?|$)", spec):
      kind, rest = "wds", spec
    elif re.search(r"\.(tfrecord|tfrec)(\?|$)", spec):
      kind, rest = "tfrecord", spec
    else:
      raise ValueError(f"data spec {spec!r}: start it with one of {', '.join(KINDS)} followed "
                       "by ':' (e.g. 'wds:/data/{00000..00099}.tar'), or 'demo'")
  location, _, query = rest.partition("?")
  options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False))
  unknown = set(options) - {"image", "text", "long_text", "label", "data_dir"}
  if unknown:
    raise ValueError(f"data spec {spec!r}: unknown option(s) {sorted(unknown)}; known: image, "
                     "text, long_text, label, data_dir")
  if not location:
    raise ValueError(f"data spec {spec!r} names no data after '{kind}:'")
  return kind, location, options


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """'a{00..02}b{x,y}' -> ['a00bx', 'a00by', 'a01bx', ...] (webdataset's shard patterns)."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  body = match.group(1)
  numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numeric:
    first, last = numeric.group(1), numeric.group(2)
    width = len(first) if len(first) > 1 and first.startswith("0") else 0
    step = 1 if int(last) >= int(first) else -1
    options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
  elif "," in body:
    options = body.split(",")
  else:
    options = ["{" + body + "}"]  # not a brace expression: keep it literally
  tails = expand_braces(pattern[match.end():])
  return [pattern[:match.start()] + option + tail for option in options for tail in tails]


def mixture(data) -> list[tuple[str, float]]:
  """config.input.data -> [(spec, weight)].

  A spec string; several joined by ';', each with an optional `?weight=W` (default 1):
  'wds:/d/{00000..00999}.tar?weight=0.8; tfds:coco_captions:train?text=captions/text&weight=0.2'.
  A sequence of (spec, weight) pairs is accepted too.
  """
  if isinstance(data, str):
    pairs = [_weighted(entry, data) for entry in data.split(";")]
  else:
    try:
      pairs = [(str(spec), float(weight)) for spec, weight in data]
    except (TypeError, ValueError) as e:
      raise ValueError(f"config.input.data={data!r}: use a spec string or ((spec, weight), ...)"
                       ) from e
  if not pairs or any(not w > 0 for _, w in pairs):
    raise ValueError(f"config.input.data={data!r}: a mixture needs positive weights")
  if len(pairs) > 1 and any(parse_spec(spec)[0] == "demo" for spec, _ in pairs):
    raise ValueError("config.input.data: 'demo' cannot be part of a mixture")
  return pairs


def _weighted(entry: str, data: str) -> tuple[str, float]:
  """'spec?a=b&weight=W' -> ('spec?a=b', W)."""
  entry = entry.strip()
  if not entry:
    raise ValueError(f"config.input.data={data!r} has an empty entry (check the ';')")
  spec, _, query = entry.partition("?")
  weight, options = 1.0, []
  for item in filter(None, query.split("&")):
    key, _, value = item.partition("=")
    if key.strip() == "weight":
      try:
        weight = float(value)
      except ValueError:
        raise ValueError(f"config.input.data: {entry!r} has weight={value!r}, not a number"
                         ) from None
    else:
      options.append(item)
  return (spec + "?" + "&".join(options) if options else spec), weight


def is_demo(config) -> bool:
  """Whether config.input.data is the built-in demo data (which is never mixed)."""
  return parse_spec(mixture(config.input.data)[0][0])[0] == "demo"
