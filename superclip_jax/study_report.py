"""The study's report from its runs' result files: results.json, study.md and PNG figures.

A cell is one (loss, mode, caption regime, batch size): its mean and sample standard deviation
(ddof=1; none for one seed) over the seeds, per metric. CLIP has no head, so its 'dual' cell
is its 'short' one (`train_regime`). docs/study.md shows the layout.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np

from superclip_jax import fs, models

# Default metrics of the tables and figures: top-1 accuracies and Recall@1 / @10 (not a linear
# probe's held-out `val_top1`, which only picks its regularisation).
DEFAULT_METRICS = re.compile(r".*(?<!/val_)(top1|_R@1|_R@10)$")
MODE_NAMES = {("softmax", "clip"): "CLIP", ("softmax", "superclip"): "SuperCLIP",
              ("sigmoid", "clip"): "SigLIP", ("sigmoid", "superclip"): "SigLIP + head"}
BATCH_FIGURE, REGIME_FIGURE = "batch_size.png", "caption_regimes.png"


def train_regime(mode: str, regime: str) -> str:
  """The captions a run trains on: without a head, 'dual' is 'short' (the same run)."""
  return "short" if regime == "dual" and not models.has_head(mode) else regime


def default_metrics(results: list[dict]) -> list[str]:
  """Every run's metrics that match DEFAULT_METRICS: accuracies first, then recalls."""
  names = {k for r in results for k in r["metrics"] if DEFAULT_METRICS.match(k)}
  return sorted(names, key=lambda k: (not k.endswith("top1"), k))


def aggregate(results: list[dict], metrics: list[str]) -> list[dict]:
  """One row per (contrastive, mode, regime, batch_size, metric): mean, std, n, seeds."""
  groups: dict[tuple, list[dict]] = {}
  for r in results:
    groups.setdefault((r["contrastive"], r["mode"], r["regime"], r["batch_size"]), []).append(r)
  cells = []
  for (contrastive, mode, regime, batch), runs in sorted(groups.items()):
    runs = sorted(runs, key=lambda r: r["seed"])
    for metric in metrics:
      values = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
      if not values:
        continue
      std = float(np.std(values, ddof=1)) if len(values) > 1 else None
      cells.append(dict(contrastive=contrastive, mode=mode, regime=regime, batch_size=batch,
                        metric=metric, mean=float(np.mean(values)), std=std, n=len(values),
                        seeds=[r["seed"] for r in runs if metric in r["metrics"]]))
  return cells


class _Cells:
  """Cell lookup by (contrastive, mode, regime as reported, batch, metric)."""

  def __init__(self, cells):
    self._by = {(c["contrastive"], c["mode"], c["regime"], c["batch_size"], c["metric"]): c
                for c in cells}

  def get(self, contrastive, mode, regime, batch, metric):
    return self._by.get((contrastive, mode, train_regime(mode, regime), batch, metric))


def fmt_cell(cell) -> str:
  """'45.3 ± 1.2' (percent), '45.3' for one seed, '–' for none."""
  if cell is None:
    return "–"
  text = f"{100 * cell['mean']:.1f}"
  return text if cell["std"] is None else f"{text} ± {100 * cell['std']:.1f}"


def fmt_diff(a, b) -> str:
  """b − a in percentage points ('+1.4'), with the standard error of that difference where
  both cells have several seeds ('+1.4 ± 0.6', Welch's sqrt(s_a²/n_a + s_b²/n_b)), in bold
  when it is more than twice its standard error; '–' if either is missing."""
  if a is None or b is None:
    return "–"
  diff = 100 * (b["mean"] - a["mean"])
  if a["std"] is None or b["std"] is None:
    return f"{diff:+.1f}"
  se = 100 * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
  text = f"{diff:+.1f} ± {se:.1f}"
  return f"**{text}**" if abs(diff) > 2 * se else text


def markdown(cells, *, modes, batch_sizes, regimes, metrics, settings, runs_expected: int,
             runs_done: int, figures: list[str], figure_note: str = "") -> str:
  look = _Cells(cells)
  lines = ["# CLIP vs SuperCLIP study", "",
           f"{runs_done} of {runs_expected} runs finished. Every run saw "
           f"{settings['samples']:,} samples (steps = samples / batch), lr "
           f"{settings['lr']:g}, warm-up {100 * settings['warmup_fraction']:.1f}% of the "
           "steps, cosine decay. Values: the metric × 100, mean ± sample std over seeds "
           "(n seeds per cell in results.json); Δ = SuperCLIP − CLIP in points ± its standard "
           "error, in bold where |Δ| is more than twice that.", ""]
  pair = [m for m in ("clip", "superclip") if m in modes]
  for metric in metrics:
    lines += [f"## {metric}", "", "| captions | batch | " +
              " | ".join(MODE_NAMES["softmax", m] for m in pair) +
              (" | Δ |" if len(pair) == 2 else " |"),
              "|---|---:|" + "---:|" * (len(pair) + (len(pair) == 2))]
    for regime in regimes:
      for batch in batch_sizes:
        got = [look.get("softmax", m, regime, batch, metric) for m in pair]
        row = f"| {regime} | {batch} | " + " | ".join(fmt_cell(c) for c in got)
        lines.append(row + (f" | {fmt_diff(*got)} |" if len(pair) == 2 else " |"))
    lines.append("")
  siglip = sorted({c["batch_size"] for c in cells if c["contrastive"] == "sigmoid"})
  for batch in siglip:
    lines += [f"## SigLIP loss, batch {batch}, short captions", "",
              "| metric | SigLIP | SigLIP + head | Δ |", "|---|---:|---:|---:|"]
    for metric in metrics:
      got = [look.get("sigmoid", m, "short", batch, metric) for m in ("clip", "superclip")]
      lines.append(f"| {metric} | {fmt_cell(got[0])} | {fmt_cell(got[1])} | "
                   f"{fmt_diff(*got)} |")
    lines.append("")
  lines += ["## Figures", ""]
  lines += [f"![{name}]({name})" for name in figures] or [figure_note]
  return "\n".join(lines) + "\n"


def figures(out: str, cells, *, modes, batch_sizes, regimes, metrics) -> list[str]:
  """batch_size.png (the paper's Figure 4: each metric vs batch size, the first regime) and
  caption_regimes.png (each metric vs batch size, a line per model and regime).
  -> the file names."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  look = _Cells(cells)
  pair = [m for m in ("clip", "superclip") if m in modes]
  cols = min(4, len(metrics))
  rows = math.ceil(len(metrics) / cols)

  def figure(name, title, lines, legend_size):
    """Each metric against batch size, one line per (mode, regime, matplotlib style)."""
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
      for mode, regime, style in lines:
        got = [(b, look.get("softmax", mode, regime, b, metric)) for b in batch_sizes]
        got = [(b, c) for b, c in got if c is not None]
        ax.errorbar([b for b, _ in got], [100 * c["mean"] for _, c in got],
                    yerr=[100 * (c["std"] or 0.0) for _, c in got], marker="o", capsize=3,
                    **style)
      ax.set_xscale("log", base=2)
      ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
      ax.set_title(metric, fontsize=9)
      ax.set_xlabel("batch size")
      ax.set_ylabel("× 100")
      ax.legend(fontsize=legend_size)
    for ax in list(axes.flat)[len(metrics):]:
      ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(fs.join(out, name), dpi=100)
    plt.close(fig)
    return name

  regime = regimes[0]
  batch = figure(BATCH_FIGURE,
                 f"CLIP vs SuperCLIP by batch size ({regime} captions; mean ± std over seeds)",
                 [(mode, regime, {"label": MODE_NAMES["softmax", mode]}) for mode in pair], 8)
  # Every regime: a line per (model, regime); CLIP's dual run is its short one
  # (train_regime), so it gets no line of its own.
  styles = {"short": "-", "long": ":", "dual": "--"}
  lines = [(mode, r, {"color": colour, "linestyle": styles.get(r, "-"),
                      "label": f"{MODE_NAMES['softmax', mode]}, {r}"})
           for colour, mode in zip(("C0", "C1"), pair)
           for r in dict.fromkeys(train_regime(mode, r) for r in regimes)]
  return [batch, figure(REGIME_FIGURE, "Caption regimes by batch size (mean ± std over seeds)",
                        lines, 7)]


def write(out: str, results: list[dict], *, modes, batch_sizes, regimes, metrics, settings,
          runs_expected: int) -> list[str]:
  """Writes results.json, study.md and the figures into `out`; -> their paths."""
  results = sorted(results, key=lambda r: r["name"])
  metrics = list(metrics) or default_metrics(results)
  cells = aggregate(results, metrics)
  fs.write_text(fs.join(out, "results.json"), json.dumps(
      {"settings": settings, "metrics": metrics, "runs": results, "cells": cells}, indent=1))
  names, note = [], ""
  if cells:
    try:
      names = figures(out, cells, modes=modes, batch_sizes=batch_sizes, regimes=regimes,
                      metrics=metrics)
    except ImportError:
      note = ("No figures: matplotlib is not installed (`pip install -e '.[study]'`, then "
              "`python -m superclip_jax.study --out=DIR --report_only` with the same flags).")
  else:
    note = "No figures: no run has finished."
  fs.write_text(fs.join(out, "study.md"), markdown(
      cells, modes=modes, batch_sizes=batch_sizes, regimes=regimes, metrics=metrics,
      settings=settings, runs_expected=runs_expected, runs_done=len(results), figures=names,
      figure_note=note))
  return [fs.join(out, n) for n in ("results.json", "study.md", *names)]
