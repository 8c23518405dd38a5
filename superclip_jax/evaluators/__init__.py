"""Evaluators, chosen by name in `config.evals`, each with its own schedule.

    config.evals.zeroshot_imagenet = dict(type='zeroshot', every_steps=2000, data=..., ...)
    config.evals.retrieval_coco = dict(type='retrieval', every_steps=2000, data=..., ...)
    config.evals.linear_probe_cifar10 = dict(type='linear_probe', every_steps=0, ...)

The key is the eval's name: its metrics are logged as '{name}/{metric}' (e.g.
'zeroshot_imagenet/top1'). `type` picks the evaluator (default: the name itself);
`every_steps` runs it every that many steps (0: only after the last step; the standalone
`python -m superclip_jax.evaluate` runs every configured eval). The remaining fields are the
keyword-only arguments of the evaluator's constructor, whose signature lists them with their
defaults (`common.from_config`); data is named with spec strings (`eval_data`).

An evaluator is a class `Evaluator(config, model, mesh, *, fields...)` whose `run(params)`
returns {metric_name: float}; `needs_text` says whether it needs a text tower. To add one,
see docs/evaluation.md ("Adding an evaluator").
"""
from __future__ import annotations

from superclip_jax import models
from superclip_jax.evaluators import common, linear_probe, retrieval, zeroshot

REGISTRY = {
    "zeroshot": zeroshot.ZeroShotEvaluator,
    "retrieval": retrieval.RetrievalEvaluator,
    "linear_probe": linear_probe.LinearProbeEvaluator,
}


def build(config, model, mesh, names=None) -> list:
  """[(name, every_steps, evaluator)] for every entry of config.evals (or those in `names`)."""
  evals = dict(config.evals)
  if names is not None:
    unknown = sorted(set(names) - set(evals))
    if unknown:
      raise ValueError(f"evals {unknown} are not in config.evals ({sorted(evals)})")
    evals = {n: evals[n] for n in names}
  out = []
  for name, ev in evals.items():
    kind = ev.get("type", name)
    if kind not in REGISTRY:
      raise ValueError(f"config.evals.{name}: unknown evaluator type {kind!r}; "
                       f"available: {sorted(REGISTRY)}")
    cls = REGISTRY[kind]
    if cls.needs_text and not models.has_text(config.model.mode):
      raise ValueError(f"config.evals.{name}: {kind} needs a text tower, which "
                       f"model.mode={config.model.mode!r} does not have; remove it from "
                       "config.evals (linear_probe works without one)")
    try:
      evaluator = common.from_config(cls, ev, config, model, mesh)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise type(e)(f"config.evals.{name}: {e}") from e
    out.append((name, int(ev.get("every_steps", 0)), evaluator))
  return out
