"""LAION's `clip_benchmark` command, with the one fix it needs under NumPy >= 2.4.

  python -m superclip_jax.tools.clip_benchmark_eval eval --model=local-dir:EXPORT ...

takes exactly `clip_benchmark`'s arguments (docs/evaluation.md, "Cross-check with
clip_benchmark"). clip-benchmark 1.6.2's zero-shot `accuracy()` converts a one-element array
with `float()`, which NumPy 2.4 made an error ("only 0-dimensional arrays can be converted to
Python scalars", LAION-AI/CLIP_benchmark#147), so every zero-shot classification run fails
after scoring the images. Here `accuracy` is replaced by the same computation summed to a
scalar first; nothing else changes.
"""
from __future__ import annotations

import sys


def accuracy(output, target, topk=(1,)):
  """clip_benchmark's `zeroshot_classification.accuracy` (top-k hit rates of logits [N, C] for
  labels [N]), with the hit count taken as a scalar."""
  pred = output.topk(max(topk), 1, True, True)[1].t()
  correct = pred.eq(target.view(1, -1).expand_as(pred))
  return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


def main() -> int:
  from clip_benchmark import cli
  from clip_benchmark.metrics import zeroshot_classification
  zeroshot_classification.accuracy = accuracy
  sys.argv[0] = "clip_benchmark"
  return cli.main()


if __name__ == "__main__":
  sys.exit(main())
