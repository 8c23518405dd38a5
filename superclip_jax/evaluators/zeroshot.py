"""Zero-shot classification: class prompts -> averaged text embeddings -> nearest class.

Each class's embedding is CLIP's prompt ensemble: every template filled with the class name,
encoded and L2-normalised, averaged over templates, L2-normalised again. Class embeddings are
computed once per evaluation (the prompts are tokenized once per evaluator). An image is
classified by cosine similarity; top-k counts a hit when fewer than k other classes score at
least as high as the true class (ties count against the model; see `common.rank_of_true`).

    config.evals.zeroshot_imagenet = dict(
        type='zeroshot', every_steps=2000, batch_size=1024,
        data=dict(source='image_folder', path='/data/imagenet/val'),  # or source='tfds',
        classnames='imagenet', templates='openai_imagenet')          # name='imagenet2012'

`classnames` / `templates`: a built-in list name (CLASSNAMES / TEMPLATES below) or a list.
With the demo data (`data='demo'`) there are three tasks (colour, shape, position), each with
its own classes and templates, reported as '{task}_top1'.
"""
from __future__ import annotations

import jax
import numpy as np

from superclip_jax import classnames as names
from superclip_jax import sharding, tokenizer
from superclip_jax.data import demo
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
  bad = [t for t in templates if t.count("{}") != 1]
  if bad:
    raise ValueError(f"zeroshot templates must contain exactly one '{{}}': {bad[:3]}")
  return classnames, templates


class ZeroShotEvaluator:
  """Fields: data, classnames, templates, batch_size (256), text_batch_size (= batch_size),
  num_examples (all; the demo: 512), ks ((1, 5))."""

  def __init__(self, eval_config, config, model, mesh):
    self.config = config
    self.mesh = mesh
    self.data = eval_data.as_dict(eval_config.get("data", "demo"))
    self.batch_size = int(eval_config.get("batch_size", 256))
    self.text_batch_size = int(eval_config.get("text_batch_size", self.batch_size))
    self.num_examples = eval_config.get("num_examples")
    self.ks = tuple(eval_config.get("ks", (1, 5)))
    common.local_batch_size(self.batch_size, mesh)
    common.local_batch_size(self.text_batch_size, mesh, "eval text_batch_size")
    if self.data["source"] == "demo":
      # task -> (label field, class names, templates)
      self.tasks = {task: (task, *resolve(c, t)) for task, (c, t) in demo.ZEROSHOT_TASKS.items()}
    else:
      self.tasks = {"": ("label", *resolve(eval_config.get("classnames", "imagenet"),
                                           eval_config.get("templates")))}
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
