"""The run-end summary (issue 34): each eval's headline metrics beside their chance level,
checked against closed forms and against random embeddings scored by the real evaluators."""
import math
import os
import sys

import numpy as np
import pytest

from superclip_jax.evaluators import common, retrieval, summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("n,c,k", [(1024, 2, 1), (1024, 2, 10), (50, 5, 7), (10, 1, 3)])
def test_retrieval_chance_is_the_hypergeometric_hit_probability(n, c, k):
  assert summary.retrieval_chance(n, c, k) == pytest.approx(
      1 - math.comb(n - c, k) / math.comb(n, k))


def test_chance_levels_match_random_embeddings_through_the_real_ranking():
  """Random embeddings are a model at chance: their recall, averaged over draws, is the
  level the summary prints (tolerance: 4 standard errors of the mean)."""
  rng = np.random.default_rng(0)
  images, per_image, k, draws = 64, 2, 5, 200
  text_image = np.repeat(np.arange(images), per_image)
  i2t, t2i = [], []
  for _ in range(draws):
    zimg = common.l2_normalize(rng.normal(size=(images, 16)))
    ztxt = common.l2_normalize(rng.normal(size=(images * per_image, 16)))
    out = retrieval.recall_at_k(*retrieval.retrieval_ranks(zimg, ztxt, text_image), ks=(k,))
    i2t.append(out[f"image_to_text_R@{k}"])
    t2i.append(out[f"text_to_image_R@{k}"])
  for values, expected in ((i2t, summary.retrieval_chance(images * per_image, per_image, k)),
                           (t2i, summary.retrieval_chance(images, 1, k))):
    sem = np.std(values) / np.sqrt(draws)
    assert abs(np.mean(values) - expected) < 4 * sem + 1e-9, (np.mean(values), expected)
  # Zero-shot top-1 of random class embeddings: one class in `classes`.
  classes = 5
  hits = [np.mean(common.rank_of_true(rng.normal(size=(256, classes)),
                                      rng.integers(0, classes, 256)) == 0)
          for _ in range(draws)]
  assert abs(np.mean(hits) - 1 / classes) < 4 * np.std(hits) / np.sqrt(draws)


class _Levels:
  def __init__(self, levels):
    self.levels = levels

  def chance_levels(self, metrics):
    del metrics
    return self.levels


def test_summary_lines_name_each_metric_its_value_and_chance():
  lines = summary.lines(1024, 16384, [
      ("zeroshot", _Levels({"position_top1": 0.2, "missing_top1": 0.5}),
       {"position_top1": 0.998, "num_examples": 512.0}),
      ("probe", object(), {"top1": 0.5})])  # no chance_levels: no line
  assert lines == ["Final evals at step 1,024 (16,384 samples seen):",
                   "  zeroshot/position_top1   99.8%   (chance 20.0%)"]
  assert summary.lines(1, 1, [("probe", object(), {"top1": 0.5})]) == []


def test_the_demo_default_is_the_studys_batch_16_short_caption_cell():
  """configs/demo.py's first-command task trains exactly the study's run (docs/study.md:
  SuperCLIP, batch 16, short captions naming the position, 16,384 samples) that the README
  quotes, not a setting tuned apart from it."""
  sys.path.insert(0, REPO)
  from configs import demo
  from superclip_jax import study
  base = demo.get_config("task=shapes")
  for field, value in study.STUDY_CONFIG.items():
    study._set(base, field, value)
  cell = study.run_config(base, study.Run("superclip", 16, "short", 0), 16384,
                          base.schedule.warmup_steps / base.total_steps, base.lr)
  first = demo.get_config()
  for field in ("model", "loss", "schedule", "optax"):
    assert first[field].to_dict() == cell[field].to_dict(), field
  for field in ("lr", "wd", "total_steps", "seed"):
    assert first[field] == cell[field], field
  assert first.input.to_dict() == cell.input.to_dict()
  with pytest.raises(ValueError, match="task='colour'.*position, shapes"):
    demo.get_config("task=colour")
