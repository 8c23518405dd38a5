"""Zero-shot classification: class prompts -> averaged text embeddings -> nearest class.

Each class's embedding is CLIP's prompt ensemble: every template filled with the class name,
encoded and L2-normalised, averaged over templates, L2-normalised again. Class embeddings are
computed once per evaluation (the prompts are tokenized once per evaluator). An image is
classified by cosine similarity; top-k counts a hit when fewer than k other classes score at
least as high as the true class (ties count against the model; see `common.rank_of_true`).

    config.evals.zeroshot_imagenet = dict(
        type='zeroshot', every_steps=2000, batch_size=1024,
        data='folder:/data/imagenet/val',  # or 'tfds:imagenet2012:validation'
        templates='openai_imagenet')  # classnames: the data's own (1,000 ids: 'imagenet')

Fields: the keyword-only arguments of `ZeroShotEvaluator` (docs/evaluation.md).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from superclip_jax import classnames as names
from superclip_jax import sharding, tokenizer
from superclip_jax.data import demo
from superclip_jax.data import spec as data_spec
from superclip_jax.evaluators import common, eval_data

CLASSNAMES = {
    "imagenet": names.IMAGENET_CLASSNAMES,
    "cifar10": names.CIFAR10_CLASSNAMES,
    "cifar100": names.CIFAR100_CLASSNAMES,
}
TEMPLATES = {
    "openai_imagenet": names.OPENAI_IMAGENET_TEMPLATES,  # the 80 CLIP ImageNet templates
    "cifar": names.CIFAR_TEMPLATES,  # CLIP's 18 CIFAR templates
    "plain": ("{}",),  # the class name itself
}
# Default templates by class-name list.
DEFAULT_TEMPLATES = {"imagenet": "openai_imagenet", "cifar10": "cifar", "cifar100": "cifar"}


def resolve(classnames, templates) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Class names and templates from built-in names or explicit lists; validated."""
  if isinstance(classnames, str):
    if classnames not in CLASSNAMES:
      raise ValueError(f"zeroshot classnames={classnames!r}: use one of {sorted(CLASSNAMES)} "
                       "or a list of names")
    if templates is None:
      templates = DEFAULT_TEMPLATES[classnames]
    classnames = CLASSNAMES[classnames]
  if templates is None:
    templates = "openai_imagenet"
  if isinstance(templates, str):
    if templates not in TEMPLATES:
      raise ValueError(f"zeroshot templates={templates!r}: use one of {sorted(TEMPLATES)} "
                       "or a list of format strings with one '{}'")
    templates = TEMPLATES[templates]
  classnames, templates = tuple(classnames), tuple(templates)
  if not classnames or not templates:
    raise ValueError("zeroshot needs at least one class name and one template")
  return classnames, data_spec.check_templates(templates, "zeroshot templates")


_WORDNET_ID = re.compile(r"n\d{8}")


def class_names(classnames, data_classes: Sequence[str] | None, spec: str):
  """What `resolve` makes the prompts from, checked against the classes the data carries.

  classnames: None (the data's own names: a folder's with '_' read as a space, TFDS
  ClassLabel names; 1,000 WordNet ids mean 'imagenet'), a built-in list name or a list (one
  name per class, in label order), or a mapping {data class name: prompt name}.
  data_classes: `eval_data.class_list` (None: the data has no class names to check against).
  """
  if isinstance(classnames, Mapping) or hasattr(classnames, "to_dict"):
    mapping = dict(classnames.to_dict() if hasattr(classnames, "to_dict") else classnames)
    if data_classes is None:
      raise ValueError(f"classnames: a mapping renames the data's classes, and {spec} has no "
                       "class names: give a list, one name per label")
    missing = [c for c in data_classes if c not in mapping]
    unknown = sorted(set(mapping) - set(data_classes))
    if missing or unknown:
      problems = ([f"has no name for {_listed(map(repr, missing))}"] if missing else []) + (
          [f"names {_listed(map(repr, unknown))}, not a class"] if unknown else [])
      raise ValueError(f"classnames: the mapping {'; '.join(problems)} of {spec} (its "
                       f"{len(data_classes)} classes: {_listed(data_classes)})")
    return tuple(str(mapping[c]) for c in data_classes)
  if classnames is None:
    if data_classes is None:
      raise ValueError(f"classnames: {spec} has no class names; give them (a list in label "
                       f"order, or one of {sorted(CLASSNAMES)})")
    if all(_WORDNET_ID.fullmatch(c) for c in data_classes):
      if len(data_classes) == len(names.IMAGENET_CLASSNAMES):
        return "imagenet"  # ILSVRC's ids, sorted: the order of IMAGENET_CLASSNAMES
      raise ValueError(f"classnames: the classes of {spec} are WordNet ids "
                       f"({data_classes[0]}, ...), not words to prompt with: give classnames "
                       "(a list in sorted-id order, or a mapping {id: name})")
    if all(c.isdigit() for c in data_classes):  # e.g. a TFDS ClassLabel given no names
      raise ValueError(f"classnames: the classes of {spec} are numbers ({data_classes[0]}, "
                       "...), not words to prompt with: give classnames (a list in label "
                       "order, or a mapping {class: name})")
    return tuple(c.replace("_", " ") for c in data_classes)
  count = (len(CLASSNAMES[classnames]) if isinstance(classnames, str)
           and classnames in CLASSNAMES else None if isinstance(classnames, str)
           else len(classnames))
  if data_classes is not None and count is not None and count != len(data_classes):
    raise ValueError(f"classnames has {count} names but {spec} has {len(data_classes)} classes "
                     f"({_listed(data_classes)}): give one name per class in label order, a "
                     "mapping {class: name}, or leave it out for the data's own names")
  return classnames


def _listed(items, shown: int = 5) -> str:
  items = list(items)
  return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


class ZeroShotEvaluator:
  """Top-k accuracy of classifying `data`'s images by their nearest class prompt embedding.

  Args (fields of the eval's config; defaults in the signature):
    data: labelled eval data (`eval_data`); the demo has three tasks (colour, shape,
      position), each with its own classes and templates, reported as '{task}_top1'.
    classnames: None (the data's own class names: a folder's, TFDS ClassLabel names), a
      built-in list name (CLASSNAMES), a list (one per class, in label order) or a mapping
      {data class name: prompt name} (`class_names`); not for the demo.
    templates: a built-in list name (TEMPLATES), a list of '...{}...' strings, or None: the
      class names' DEFAULT_TEMPLATES ('openai_imagenet' for a list of names).
    batch_size: global image batch, a multiple of the device and process counts.
    text_batch_size: global batch for encoding the prompts (None: batch_size).
    num_examples: evaluate the first n examples (None: all; the demo renders 512).
    ks: the top-k accuracies reported (k < the number of classes).
  """
  needs_text = True

  def __init__(self, config, model, mesh, *, data: str = "demo", classnames=None,
               templates=None, batch_size: int = 256, text_batch_size: int | None = None,
               num_examples: int | None = None, ks=(1, 5)):
    self.config = config
    self.mesh = mesh
    self.data = eval_data.parse(data, eval_data.LABELS)
    self.batch_size = int(batch_size)
    self.text_batch_size = int(self.batch_size if text_batch_size is None else text_batch_size)
    self.num_examples = num_examples
    self.ks = tuple(ks)
    common.local_batch_size(self.batch_size, mesh)
    common.local_batch_size(self.text_batch_size, mesh, "eval text_batch_size")
    if self.data.kind == "demo":
      # task -> (label field, class names, templates)
      self.tasks = {task: (task, *resolve(c, t)) for task, (c, t) in demo.ZEROSHOT_TASKS.items()}
    else:
      chosen = class_names(classnames, eval_data.class_list(self.data), self.data.spec)
      self.tasks = {"": ("label", *resolve(chosen, templates))}
    self._tokens = {}  # task -> prompt tokens [classes * templates, context], made once

    def encode_text(params, batch):
      return {"z": model.apply({"params": params}, batch["tokens"], method="encode_text")}

    def rank_images(inputs, batch):
      params, class_embeddings = inputs
      z, _ = model.apply({"params": params}, batch["image"], method="encode_image")
      return {f"rank/{task}": common.rank_of_true(z @ zcls.T, batch[self.tasks[task][0]])
              for task, zcls in class_embeddings.items()}

    self._encode_text = common.BatchedFn(encode_text, mesh)
    self._rank_images = common.BatchedFn(rank_images, mesh, keep=("bad",))

  def prompt_tokens(self, task: str) -> np.ndarray:
    if task not in self._tokens:
      _, classnames, templates = self.tasks[task]
      prompts = [t.format(c) for c in classnames for t in templates]
      self._tokens[task] = tokenizer.tokenize(prompts, self.config.model.context_length)
    return self._tokens[task]

  def class_embeddings(self, params, task: str) -> np.ndarray:
    """[num_classes, embed]: each class's prompt embeddings averaged, then L2-normalised."""
    _, classnames, templates = self.tasks[task]
    tokens = self.prompt_tokens(task)
    start, stop = common.host_slice(len(tokens))
    z = self._encode_text(params, {"tokens": tokens[start:stop]}, self.text_batch_size)["z"]
    z = common.l2_normalize(z).reshape(len(classnames), len(templates), -1).mean(axis=1)
    return common.l2_normalize(z)

  def run(self, params) -> dict:
    zcls = {task: self.class_embeddings(params, task) for task in self.tasks}
    zcls = jax.device_put(zcls, sharding.replicated(self.mesh))
    local = common.local_batch_size(self.batch_size, self.mesh)
    ds = eval_data.classification_data(self.data, self.config, local,
                                       num_examples=self.num_examples)
    out = self._rank_images((params, zcls), ds, self.batch_size)
    metrics = {}
    for task, (_, classnames, _) in self.tasks.items():
      prefix = f"{task}_" if task else ""
      metrics.update(common.topk_accuracy(out[f"rank/{task}"], self.ks, len(classnames), prefix))
    metrics["num_examples"] = float(len(out["bad"]))
    metrics["num_bad_images"] = float(np.sum(out["bad"]))
    return metrics

  def chance_levels(self, metrics: dict) -> dict:
    """Each task's top-1 against a uniform guess over its classes (the run-end summary)."""
    del metrics
    return {f"{task}_top1" if task else "top1": 1.0 / len(classnames)
            for task, (_, classnames, _) in self.tasks.items()}
