"""The study command (superclip_jax/study.py): its grid and run configs, the retrieval eval's
caption choice, and the --quick study end to end: the report against numbers recomputed here
from the runs' result files, the figures, a re-run that skips finished runs, a resumed run."""
import importlib.util
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from superclip_jax import study, study_report
from superclip_jax.evaluators import retrieval
from tests import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", f"{REPO}/configs/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("task=shapes")  # the study's base (study.py)


# --- Grid and configs (nothing trains) -------------------------------------------------------


def test_grid_merges_clip_dual_and_adds_the_siglip_pair():
  runs = study.grid(["clip", "superclip"], [8, 16], ["short", "long", "dual"], [0, 1], 16)
  names = [r.name for r in runs]
  assert len(names) == len(set(names))
  expected = set()
  for seed in (0, 1):
    for b in (8, 16):
      expected |= {f"softmax-clip-b{b}-short-s{seed}", f"softmax-clip-b{b}-long-s{seed}"}
      expected |= {f"softmax-superclip-b{b}-{r}-s{seed}" for r in ("short", "long", "dual")}
    expected |= {f"sigmoid-clip-b16-short-s{seed}", f"sigmoid-superclip-b16-short-s{seed}"}
  assert set(names) == expected
  # Seed by seed: every run of seed 0 comes before any of seed 1.
  assert [r.seed for r in runs] == sorted(r.seed for r in runs)
  assert [r.name for r in study.grid(["clip"], [8], ["short"], [0], 0)] == [
      "softmax-clip-b8-short-s0"]  # siglip_batch 0: no SigLIP pair


def test_run_config_same_samples_warmup_fraction_and_split_retrieval():
  base = demo_config()
  for batch in (16, 64):
    c = study.run_config(base, study.Run("superclip", batch, "dual", 2), 4096, 0.1, 5e-4)
    assert c.total_steps * batch == 4096
    assert c.schedule.warmup_steps == round(0.1 * 4096 / batch)
    assert (c.seed, c.lr, c.model.mode) == (2, 5e-4, "superclip")
    assert c.input.demo.long_captions_for_head
    assert sorted(c.evals) == ["retrieval_long", "retrieval_short", "zeroshot"]
    assert c.evals.retrieval_short.caption_index == 0
    assert c.evals.retrieval_long.caption_index == 1
    assert all(ev.every_steps == 0 for ev in c.evals.values())
  short = study.run_config(base, study.Run("clip", 16, "short", 0), 4096, 0.1, 1e-3)
  assert not short.input.demo.long_captions_for_head
  siglip = study.run_config(base, study.Run("clip", 16, "short", 0, "sigmoid"), 4096, 0.1, 1e-3)
  assert siglip.loss.contrastive == "sigmoid"
  assert (siglip.model.logit_bias, siglip.model.logit_scale_init) == (-10.0, 2.302585)
  assert base.model.logit_bias is None and "retrieval" in base.evals  # base left alone
  with pytest.raises(ValueError, match="not a multiple of batch size 48"):
    study.run_config(base, study.Run("clip", 48, "short", 0), 4096, 0.1, 1e-3)


def test_long_regime_trains_both_losses_on_the_long_caption():
  base = demo_config()
  c = study.run_config(base, study.Run("clip", 16, "long", 0), 64, 0.1, 1e-3)
  assert c.input.demo.caption == "long" and not c.input.demo.long_captions_for_head
  from superclip_jax.data import demo
  c.model.image_size, c.input.batch_size = 16, 4
  long_rows = next(iter(demo.train_rows(c, 0, 0, 1)))
  c.input.demo.caption = "short"
  short_rows = next(iter(demo.train_rows(c, 0, 0, 1)))
  want = [demo.example(c.input.demo.seed, "train", i, 16) for i in range(4)]
  assert [x.decode() for x in long_rows["caption"].numpy()] == [w["long_caption"] for w in want]
  assert [x.decode() for x in short_rows["caption"].numpy()] == [w["caption"] for w in want]


def test_regimes_on_file_data_use_the_text_keys():
  base = demo_config()
  base.input.data = "wds:/data/{0..9}.tar"
  base.input.text_key = "txt"
  base.input.long_text_key = "json/long"
  keys = {}
  for regime in ("short", "long", "dual"):
    c = study.run_config(base, study.Run("superclip", 16, regime, 0), 64, 0.1, 1e-3)
    keys[regime] = (c.input.text_key, c.input.long_text_key)
  assert keys == {"short": ("txt", ""), "long": ("json/long", ""), "dual": ("txt", "json/long")}
  base.input.long_text_key = ""
  with pytest.raises(ValueError, match="long_text_key"):
    study.run_config(base, study.Run("superclip", 16, "dual", 0), 64, 0.1, 1e-3)
  base.input.data = "wds:/data/{0..9}.tar?text=json/short"
  with pytest.raises(ValueError, match=r"\?text="):
    study.run_config(base, study.Run("superclip", 16, "short", 0), 64, 0.1, 1e-3)


def test_settings_must_match_to_continue(tmp_path):
  study.check_settings(str(tmp_path), {"samples": 64, "lr": 1e-3})
  study.check_settings(str(tmp_path), {"samples": 64, "lr": 1e-3})
  with pytest.raises(ValueError, match="samples differ"):
    study.check_settings(str(tmp_path), {"samples": 128, "lr": 1e-3})


# --- The retrieval eval's caption_index ------------------------------------------------------


def test_retrieval_caption_index_uses_one_caption_per_image():
  """Caption 0 of image i points at image i; caption 1 leans to image i+1 (0.8 e_i+1 + 0.6
  e_i): caption 0 alone is perfect, caption 1 alone never right at R@1, both together right
  for every image and for half the captions."""
  from superclip_jax import sharding
  from tests.test_train import tiny_config
  n = 6
  zimg = np.eye(n, dtype=np.float32)
  ztxt = np.stack([np.eye(n), 0.8 * np.roll(np.eye(n), 1, axis=1) + 0.6 * np.eye(n)],
                  axis=1).astype(np.float32)
  mesh = sharding.make_mesh(tiny_config().mesh)
  results = {}
  for index in (None, 0, 1):
    ev = retrieval.RetrievalEvaluator(tiny_config(), None, mesh, num_examples=n,
                                      caption_index=index, ks=(1,))
    ev._encode = lambda params, ds, batch: {  # the embeddings above, not a model's
        "zimg": zimg, "ztxt": ztxt, "caption_mask": np.ones((n, 2), bool),
        "bad": np.zeros(n, bool)}
    results[index] = ev.run(None)
  assert results[0]["image_to_text_R@1"] == 1.0 and results[0]["text_to_image_R@1"] == 1.0
  assert results[1]["image_to_text_R@1"] == 0.0 and results[1]["text_to_image_R@1"] == 0.0
  assert results[None]["image_to_text_R@1"] == 1.0
  assert results[None]["text_to_image_R@1"] == 0.5
  assert results[0]["num_captions"] == n and results[None]["num_captions"] == 2 * n
  with pytest.raises(ValueError, match="caption_index=2"):
    retrieval.RetrievalEvaluator(tiny_config(), None, mesh, caption_index=2)


# --- The quick study end to end --------------------------------------------------------------


def _study(out, *flags):
  # Without the SigLIP pair (its configs: test_grid_merges_clip_dual_and_adds_the_siglip_pair):
  # two fewer programs to compile keeps this test near a minute and a half.
  cmd = [sys.executable, "-m", "superclip_jax.study", "--quick", f"--out={out}",
         "--siglip_batch=0", *flags]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                     env=cpu_devices.compile_cache(os.environ))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout


def _fmt(values):
  """The report's cell: percent, '± sample std' when there are two seeds or more."""
  mean = f"{100 * statistics.mean(values):.1f}"
  return mean if len(values) < 2 else f"{mean} ± {100 * statistics.stdev(values):.1f}"


def test_quick_study_report_skip_and_resume(tmp_path):
  out = tmp_path / "study"
  log = _study(out, "--keep_checkpoints")
  expected = set()
  for seed in (0, 1):
    for b in (8, 16):
      expected |= {f"softmax-clip-b{b}-short-s{seed}", f"softmax-superclip-b{b}-short-s{seed}",
                   f"softmax-superclip-b{b}-dual-s{seed}"}
  assert log.count("[study] ran ") == len(expected)
  assert "ETA" in log

  # Every run's result file, and the same samples seen by each.
  runs = {}
  for name in expected:
    with open(out / "runs" / name / "result.json") as f:
      runs[name] = json.load(f)
    assert runs[name]["samples"] == 128
    assert runs[name]["steps"] == 128 // runs[name]["batch_size"]
  report = json.loads((out / "results.json").read_text())
  assert {r["name"] for r in report["runs"]} == expected
  assert {r["name"]: r["metrics"] for r in report["runs"]} == {
      n: r["metrics"] for n, r in runs.items()}
  # The default study's short captions name the position alone (study.STUDY_CONFIG): each
  # training caption of the recorded base config, against the example's own position label.
  from superclip_jax.data import demo
  templates = demo.parse_templates(report["settings"]["base_config"]["input"]["demo"]["templates"])
  for i in range(32):
    ex = demo.example(0, "train", i, 16, templates)
    assert ex["caption"] == f"a shape in the {demo.POSITIONS[ex['position']]}"
  metrics = report["metrics"]
  assert {"zeroshot/colour_top1", "zeroshot/shape_top1", "zeroshot/position_top1",
          "retrieval_short/image_to_text_R@1", "retrieval_long/text_to_image_R@10"} <= set(metrics)

  # Cells recomputed from the result files: mean and sample std over the two seeds.
  def values(contrastive, mode, regime, batch, metric):
    return [runs[f"{contrastive}-{mode}-b{batch}-{regime}-s{s}"]["metrics"][metric]
            for s in (0, 1)]
  cells = {(c["contrastive"], c["mode"], c["regime"], c["batch_size"], c["metric"]): c
           for c in report["cells"]}
  groups = [("softmax", m, r, b) for b in (8, 16) for m, r in
            (("clip", "short"), ("superclip", "short"), ("superclip", "dual"))]
  assert len(cells) == len(groups) * len(metrics)
  for group in groups:
    for metric in metrics:
      v = values(*group, metric)
      cell = cells[(*group, metric)]
      assert cell["n"] == 2
      assert cell["mean"] == pytest.approx(statistics.mean(v), abs=1e-12)
      assert cell["std"] == pytest.approx(statistics.stdev(v), abs=1e-12)

  # The table: CLIP and SuperCLIP side by side with the difference; CLIP's dual row is its
  # short runs (no head: the same training).
  md = (out / "study.md").read_text()
  for metric in metrics:
    assert f"## {metric}\n" in md
    for regime in ("short", "dual"):
      for b in (8, 16):
        clip = values("softmax", "clip", "short", b, metric)
        sup = values("softmax", "superclip", regime, b, metric)
        diff = 100 * (statistics.mean(sup) - statistics.mean(clip))
        se = 100 * (statistics.variance(sup) / 2 + statistics.variance(clip) / 2) ** 0.5
        delta = f"{diff:+.1f} ± {se:.1f}"
        delta = f"**{delta}**" if abs(diff) > 2 * se else delta
        assert f"| {regime} | {b} | {_fmt(clip)} | {_fmt(sup)} | {delta} |" in md

  # The figures: valid PNGs, embedded in study.md.
  from PIL import Image
  for name in (study_report.BATCH_FIGURE, study_report.REGIME_FIGURE):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / name) as im:
      im.load()
      assert im.size[0] > 200 and im.size[1] > 200
    assert f"]({name})" in md

  # A run killed after its step-8 checkpoint (no result file, no step-16 checkpoint) resumes
  # from step 8 and reaches the uninterrupted run's numbers; every other run is skipped.
  killed = "softmax-superclip-b8-dual-s1"
  workdir = out / "runs" / killed
  os.remove(workdir / "result.json")
  import shutil
  shutil.rmtree(workdir / "checkpoints" / "16")
  assert (workdir / "checkpoints" / "8").is_dir()
  mtimes = {n: os.stat(out / "runs" / n / "result.json").st_mtime_ns for n in expected - {killed}}
  log = _study(out)
  assert f"{len(expected)} runs, {len(expected) - 1} finished before, 1 to run" in log
  assert log.count("[study] ran ") == 1 and f"[study] ran {killed} " in log
  assert mtimes == {n: os.stat(out / "runs" / n / "result.json").st_mtime_ns for n in mtimes}
  with open(workdir / "result.json") as f:
    resumed = json.load(f)
  for k, v in runs[killed]["metrics"].items():
    assert resumed["metrics"][k] == pytest.approx(v, abs=1e-6), k
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  trained = [r["step"] for r in records if "loss" in r]
  assert trained == [8, 16, 16]  # steps 9..16 again, not 1..8
  # Without --keep_checkpoints, the run that finished in this call lost its checkpoints once
  # its result was written; the runs kept before still have theirs.
  assert not (workdir / "checkpoints").exists()
  assert all((out / "runs" / n / "checkpoints" / str(runs[n]["steps"])).is_dir()
             for n in expected - {killed})
