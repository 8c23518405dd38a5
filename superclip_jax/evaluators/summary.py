"""The end-of-run summary: each evaluator's headline metrics beside their chance level.

An evaluator may define `chance_levels(metrics) -> {metric: chance}` for the metrics worth a
line (those of `run`'s result, without the eval's name); the summary shows those, so nobody
has to read metrics.jsonl to see whether a run learned anything.
"""
from __future__ import annotations

import math

import jax


def retrieval_chance(num_candidates: float, per_query: float, k: int) -> float:
  """P(at least one of a query's `per_query` right candidates is among the `k` best of
  `num_candidates`) when the scores are random: 1 - C(n - c, k) / C(n, k), as a product so a
  mean caption count that is not whole still gives a value."""
  n, c = float(num_candidates), float(per_query)
  if n <= 0:
    return 0.0
  miss = 1.0
  for j in range(min(k, math.floor(n))):
    miss *= max(0.0, (n - c - j) / (n - j))
  return 1.0 - miss


def lines(step: int, samples: int, results: list[tuple[str, object, dict]]) -> list[str]:
  """The summary, for [(eval name, evaluator, its metrics)]; [] when none has a level."""
  rows = []
  for name, evaluator, metrics in results:
    levels = getattr(evaluator, "chance_levels", None)
    for metric, chance in (levels(metrics) if levels else {}).items():
      if metric in metrics:
        rows.append((f"{name}/{metric}", metrics[metric], chance))
  if not rows:
    return []
  width = max(len(r[0]) for r in rows)
  out = [f"Final evals at step {step:,} ({samples:,} samples seen):"]
  for label, value, chance in rows:
    out.append(f"  {label:<{width}}  {100 * value:5.1f}%   (chance {100 * chance:.1f}%)")
  return out


def report(step: int, samples: int, results: list[tuple[str, object, dict]]) -> None:
  """Prints `lines` on process 0 (nothing when no eval has a chance level)."""
  out = lines(step, samples, results)
  if out and jax.process_index() == 0:
    print("\n".join(out), flush=True)
