"""Evaluators, chosen by name in `config.evals`, each with its own schedule.

    config.evals.zeroshot_imagenet = dict(type='zeroshot', every_steps=2000, data=..., ...)
    config.evals.retrieval_coco = dict(type='retrieval', every_steps=2000, data=..., ...)
    config.evals.linear_probe_cifar10 = dict(type='linear_probe', every_steps=0, ...)

The key is the eval's name: its metrics are logged as '{name}/{metric}' (e.g.
'zeroshot_imagenet/top1'). `type` picks the evaluator (default: the name itself);
`every_steps` runs it every that many steps (0: only after the last step; the standalone
`python -m superclip_jax.evaluate` runs every configured eval). The remaining fields belong to
the evaluator: see each module's docstring and docs/evaluation.md.

An evaluator is a class taking (eval_config, config, model, mesh) whose `run(params)` returns
{metric_name: float}. To add one, write a module next to these (use `common.BatchedFn` for the
batched, padded, multi-host inference and `eval_data` for the data) and register its class in
`REGISTRY`.
"""
from __future__ import annotations

from superclip_jax.evaluators import linear_probe, retrieval, zeroshot

REGISTRY = {
    "zeroshot": zeroshot.ZeroShotEvaluator,
    "retrieval": retrieval.RetrievalEvaluator,
    "linear_probe": linear_probe.LinearProbeEvaluator,
}
# Evaluators that need a text tower (model.mode 'superclass' has none).
NEEDS_TEXT = ("zeroshot", "retrieval")


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
    if config.model.mode == "superclass" and kind in NEEDS_TEXT:
      raise ValueError(f"config.evals.{name}: {kind} needs a text tower, which "
                       "model.mode='superclass' does not have; remove it from config.evals "
                       "(linear_probe works without one)")
    try:
      evaluator = REGISTRY[kind](ev, config, model, mesh)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise type(e)(f"config.evals.{name}: {e}") from e
    out.append((name, int(ev.get("every_steps", 0)), evaluator))
  return out
