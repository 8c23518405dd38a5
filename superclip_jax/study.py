"""The CLIP-vs-SuperCLIP study: a grid of training runs, resumable, with a report (docs/study.md).

  python -m superclip_jax.study --out=DIR            # the default grid on the demo data
  python -m superclip_jax.study --out=DIR --quick    # the CI smoke test's tiny grid
  python -m superclip_jax.study --out=DIR --config=my.py --config.input.data=...

The grid: modes (clip, superclip) x batch sizes x caption regimes (short, long, dual) x seeds,
plus one SigLIP pair (sigmoid loss without and with the head) at one batch size. Every run sees
the same number of samples (`--samples`; steps = samples // batch) with the same lr and the
same warm-up fraction. Each run trains in this process with `train.train_and_evaluate` in its
own workdir DIR/runs/NAME and is finished once DIR/runs/NAME/result.json exists: a re-run skips
finished runs, and the trainer resumes a half-finished one from its checkpoints. The report
(`study_report.py`): DIR/results.json, DIR/study.md and PNG figures.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from superclip_jax import checkpoint, config_lib, fs, study_report
from superclip_jax.data import spec as data_spec
from superclip_jax.evaluators import eval_data

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGIMES = ("short", "long", "dual")
MODES = ("clip", "superclip")
# The SigLIP pair's initial logit bias and scale: configs/demo.py's `contrastive=sigmoid`.
SIGLIP_LOGIT_BIAS = -10.0
SIGLIP_LOGIT_SCALE_INIT = 2.302585  # ln 10
RESULT = "result.json"

# The default study, when --config is left at the demo (docs/study.md; fields named on the
# command line win):
# - the demo's "mu" towers (width 64, 2 layers; 2.4x the demo model's pairs/s) at twice its
#   lr, so that the whole default grid takes under an hour on 2 CPU cores (49 min measured);
# - short captions that name the position alone: with the demo's own mix (which names colour
#   in most captions) both models learn colour and nothing else at this budget, so the grid
#   could not show the head's effect either way. The long captions are the demo's (every
#   attribute), so they carry what the short ones lack.
STUDY_CONFIG = {"model.variant": "mu/8", "lr": 2e-3,
                "input.demo.templates": "a shape in the {pos}"}

# The --quick grid (the CI smoke test): what the flags below do not set explicitly.
QUICK = dict(batch_sizes="8,16", regimes="short,dual", seeds="0,1", samples=128, siglip_batch=8)
# ckpt_steps=8 < the batch-8 runs' 16 steps: the smoke test resumes one from its checkpoint.
QUICK_CONFIG = {"model.variant": "mu/8", "model.image_size": 32, "log_training_steps": 8,
                "ckpt_steps": 8}
QUICK_EVAL = dict(num_examples=64, batch_size=64)


def define_flags() -> None:
  """The command line (defined only when run as a script: importing this module must not
  claim flag names such as --config or --out in the importer's process)."""
  config_flags.DEFINE_config_file("config",
                                  os.path.join(_REPO, "configs", "demo.py") + ":task=shapes",
                                  "Base config of every run (file.py:arg); --config.FIELD=value "
                                  "overrides any field", lock_config=False)
  flags.DEFINE_string("out", None, "Study directory: runs/, results.json, study.md, figures.")
  flags.DEFINE_bool("quick", False, "The tiny grid of the CI smoke test (docs/study.md).")
  flags.DEFINE_list("modes", list(MODES), "Models compared: clip (no head), superclip.")
  flags.DEFINE_list("batch_sizes", ["16", "32", "64", "128"], "Global batch sizes.")
  flags.DEFINE_list("regimes", list(REGIMES), "Caption regimes: short, long, dual.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed of each repetition.")
  flags.DEFINE_integer("samples", 16384, "Training samples seen by every run.")
  flags.DEFINE_integer("siglip_batch", None, "Batch size of the SigLIP pair (default: the smallest"
                       " of --batch_sizes; 0: no SigLIP pair).")
  flags.DEFINE_float("warmup_fraction", None, "Warm-up steps as a fraction of each run's steps "
                     "(default: the base config's warmup_steps / total_steps).")
  flags.DEFINE_float("lr", None, "Peak learning rate of every run (default: the base config's).")
  flags.DEFINE_list("metrics", [], "Eval metrics in the report's tables and figures, e.g. "
                    "zeroshot/shape_top1 (default: every *top1, *_R@1 and *_R@10).")
  flags.DEFINE_string("compile_cache", "DEFAULT", "Persistent JAX compilation cache shared by the "
                      "runs (DEFAULT: OUT/jax_cache unless JAX_COMPILATION_CACHE_DIR is set; "
                      "'' for none).")
  flags.DEFINE_bool("keep_checkpoints", False, "Keep each finished run's checkpoints. By default "
                    "they are deleted once the run's result.json is written (the default grid's "
                    "66 runs held 4.7 GB of them); a run stopped before that keeps its own, to "
                    "resume from.")
  flags.DEFINE_bool("report_only", False, "Write the report from the finished runs; train none.")


FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the grid."""
  mode: str  # 'clip' | 'superclip'
  batch_size: int
  regime: str  # the captions it trains on: 'short' | 'long' | 'dual'
  seed: int
  contrastive: str = "softmax"  # 'sigmoid': the SigLIP pair

  @property
  def name(self) -> str:
    return f"{self.contrastive}-{self.mode}-b{self.batch_size}-{self.regime}-s{self.seed}"


def grid(modes, batch_sizes, regimes, seeds, siglip_batch: int) -> list[Run]:
  """Every run, seed by seed (a study stopped early has whole repetitions), each CLIP run next
  to its SuperCLIP one. A CLIP run serves both 'short' and 'dual'
  (`study_report.train_regime`)."""
  runs = []
  for seed in seeds:
    for batch in batch_sizes:
      for regime in regimes:
        for mode in modes:
          run = Run(mode, batch, study_report.train_regime(mode, regime), seed)
          if run not in runs:
            runs.append(run)
    if siglip_batch:
      runs += [Run(mode, siglip_batch, "short", seed, "sigmoid") for mode in modes]
  return runs


def run_config(base, run: Run, samples: int, warmup_fraction: float, lr: float):
  """`base` set up for `run`: mode, loss, batch, steps, seed, captions, evals (last step)."""
  if samples % run.batch_size:
    raise ValueError(f"--samples={samples} is not a multiple of batch size {run.batch_size}: "
                     "the runs would see different numbers of samples")
  c = copy.deepcopy(base)
  c.model.mode = run.mode
  c.loss.contrastive = run.contrastive
  if run.contrastive == "sigmoid":
    c.model.logit_bias = SIGLIP_LOGIT_BIAS
    c.model.logit_scale_init = SIGLIP_LOGIT_SCALE_INIT
  c.input.batch_size = run.batch_size
  c.total_steps = samples // run.batch_size
  c.schedule.warmup_steps = max(1, round(warmup_fraction * c.total_steps))
  c.lr = lr
  c.seed = run.seed
  set_captions(c, run.regime)
  split_demo_retrieval(c)
  for ev in c.evals.values():  # evaluated once, after the last step
    ev.every_steps = 0
  return c


def set_captions(c, regime: str) -> None:
  """Which caption each loss trains on. The demo: config.input.demo; other data: the
  config-level text_key (short) and long_text_key (long) of docs/data.md."""
  if regime not in REGIMES:
    raise ValueError(f"--regimes: unknown regime {regime!r}; known: {', '.join(REGIMES)}")
  if data_spec.is_demo(c):
    c.input.demo.long_captions_for_head = regime == "dual"
    if regime == "long":
      if "caption" not in c.input.demo:
        raise ValueError(
            "regime 'long' needs config.input.demo.caption ('short' | 'long': the caption of "
            "the contrastive loss), which this version of the demo data does not have yet "
            "(docs/study.md, 'Caption regimes'); leave it out with --regimes=short,dual")
      c.input.demo.caption = "long"
    elif "caption" in c.input.demo:
      c.input.demo.caption = "short"
    return
  for spec, _ in data_spec.mixture(c.input.data):
    options = data_spec.parse_spec(spec)[2]
    if "text" in options or "long_text" in options:
      raise ValueError(f"config.input.data {spec!r}: the study chooses the captions through "
                       "config.input.text_key and long_text_key; move ?text= / ?long_text= "
                       "there")
  long_key = c.input.long_text_key
  if regime != "short" and not long_key:
    raise ValueError(f"regime {regime!r} needs the long captions' field: set "
                     "--config.input.long_text_key (e.g. json/long_caption), or leave the "
                     "regime out with --regimes=short")
  if regime == "long":
    c.input.text_key = long_key
  if regime != "dual":
    c.input.long_text_key = ""


def split_demo_retrieval(c) -> None:
  """Each retrieval eval on the demo data becomes NAME_short and NAME_long: retrieval with each
  image's short (caption 0) and long (caption 1) caption alone."""
  for name in list(c.evals.keys()):
    ev = c.evals[name]
    if ev.get("type") != "retrieval" or ev.get("caption_index") is not None:
      continue
    if eval_data.parse(ev.get("data", "demo"), eval_data.CAPTIONS).kind != "demo":
      continue
    fields = ev.to_dict()
    del c.evals[name]
    for suffix, index in (("short", 0), ("long", 1)):
      c.evals[f"{name}_{suffix}"] = dict(fields, caption_index=index)


# --- Running ---------------------------------------------------------------------------------


def read_result(workdir: str) -> dict | None:
  path = fs.join(workdir, RESULT)
  if not fs.exists(path):
    return None
  with fs.open(path) as f:
    return json.load(f)


def final_metrics(workdir: str, config) -> dict[str, float]:
  """Every eval metric of the run's last step, from its metrics.jsonl (the last record wins:
  a resumed run may have evaluated that step twice)."""
  out = {}
  with fs.open(fs.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record.get("step") == config.total_steps:
        out.update({k: v for k, v in record.items()
                    if k.split("/")[0] in config.evals and not k.endswith("/seconds")})
  missing = [name for name in config.evals if not any(k.startswith(name + "/") for k in out)]
  if missing:
    raise ValueError(f"{workdir}: no results of eval(s) {', '.join(missing)} at step "
                     f"{config.total_steps} in metrics.jsonl")
  return out


def train_run(run: Run, config, workdir: str) -> dict | None:
  """Trains (or resumes) one run and writes its result file; None if it was stopped."""
  from superclip_jax import train  # TensorFlow and the model: only when something trains
  t0 = time.monotonic()
  state = train.train_and_evaluate(config, workdir)
  if int(state.step) < config.total_steps:  # SIGTERM / Ctrl-C: saved, to be resumed
    return None
  result = {**dataclasses.asdict(run), "name": run.name, "steps": config.total_steps,
            "samples": config.total_steps * config.input.batch_size, "lr": config.lr,
            "warmup_steps": config.schedule.warmup_steps,
            "seconds": time.monotonic() - t0, "metrics": final_metrics(workdir, config)}
  fs.write_text(fs.join(workdir, RESULT), json.dumps(result, indent=1))  # atomic
  return result


def check_settings(out: str, settings: dict) -> None:
  """Records the study's settings in OUT/study.json; a later call must use the same ones (the
  grid's lists may grow or shrink: runs are named by their place in the grid)."""
  path = fs.join(out, "study.json")
  if fs.exists(path):
    with fs.open(path) as f:
      old = json.load(f)
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differ:
      raise ValueError(f"{out} holds a study with other settings ({', '.join(differ)} differ; "
                       f"{path} has them): pass another --out, or the same flags as before")
    return
  fs.makedirs(out)
  fs.write_text(path, json.dumps(settings, indent=1, sort_keys=True))


def run_study(out: str, runs: list[Run], configs: dict, say=print,
              keep_checkpoints: bool = True) -> tuple[list, list]:
  """Trains every unfinished run in order; -> (results of finished runs, names that failed).
  Stops (raising KeyboardInterrupt) when a run is stopped by SIGTERM or Ctrl-C. Without
  `keep_checkpoints`, a run's checkpoints are deleted once its result file is written."""
  results, failed, times = [], [], []
  todo = [r for r in runs if read_result(fs.join(out, "runs", r.name)) is None]
  say(f"[study] {len(runs)} runs, {len(runs) - len(todo)} finished before, {len(todo)} to run")
  start = time.monotonic()
  for run in runs:
    workdir = fs.join(out, "runs", run.name)
    result = read_result(workdir)
    if result is None:
      done = len(results) + len(failed)
      say(f"[study] run {done + 1}/{len(runs)}: {run.name}")
      t0 = time.monotonic()
      try:
        result = train_run(run, configs[run], workdir)
      except Exception as e:  # noqa: BLE001 -- one broken run must not lose the others
        failed.append(run.name)
        fs.makedirs(workdir)
        fs.write_text(fs.join(workdir, "error.txt"), traceback.format_exc())
        say(f"[study] FAILED {run.name}: {type(e).__name__}: {e} ({workdir}/error.txt)")
        continue
      if result is None:
        say(f"[study] stopped during {run.name}: run the same command again to continue")
        raise KeyboardInterrupt
      if not keep_checkpoints:  # the result file is written: nothing will resume from them
        fs.rmtree(fs.join(workdir, "checkpoints"))
      times.append(time.monotonic() - t0)
      eta = (len(todo) - len(times) - len(failed)) * sum(times) / len(times)
      say(f"[study] ran {run.name} in {_duration(times[-1])} | "
          f"{len(results) + len(failed) + 1}/{len(runs)} done | elapsed "
          f"{_duration(time.monotonic() - start)} | ETA {_duration(eta)}")
    results.append(result)
  return results, failed


def _duration(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


# --- Command line ----------------------------------------------------------------------------


def _base_config():
  """--config with --quick's model and evals (fields the command line names explicitly win)."""
  base = copy.deepcopy(FLAGS.config)
  named = {a.split("=", 1)[0][len("--config."):] for a in sys.argv if a.startswith("--config.")}
  if not FLAGS["config"].present:
    for field, value in STUDY_CONFIG.items():
      if field not in named:
        _set(base, field, value)
  if FLAGS.quick:
    for field, value in QUICK_CONFIG.items():
      if field not in named:
        _set(base, field, value)
    for name, ev in base.evals.items():
      for k, v in QUICK_EVAL.items():
        if f"evals.{name}.{k}" not in named:
          ev[k] = v
  return base


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    config = config[p]
  config[leaf] = value


def _flag(name: str):
  """A grid flag's value: --quick's unless given on the command line."""
  if FLAGS.quick and name in QUICK and not FLAGS[name].present:
    value = QUICK[name]
    return value.split(",") if isinstance(value, str) else value
  return FLAGS[name].value


def _ints(name: str) -> list[int]:
  try:
    return [int(v) for v in _flag(name)]
  except ValueError:
    raise ValueError(f"--{name}: expected integers separated by ',', got {_flag(name)}") from None


def main(argv):
  del argv
  if not FLAGS.out:
    sys.exit("Error: --out is required: the study's directory (runs/, results.json, study.md)")
  if not FLAGS["verbosity"].present:  # orbax is chatty at INFO; progress goes to stdout
    logging.set_verbosity(logging.WARNING)
    checkpoint.orbax_errors_in_one_line()
  try:
    _main(FLAGS.out)
  except ValueError as e:
    if FLAGS["verbosity"].present:
      raise
    sys.exit(f"Error: {e}")
  except KeyboardInterrupt:
    sys.exit(130)


def _main(out: str) -> None:
  base = _base_config()
  modes = list(_flag("modes"))
  regimes = list(_flag("regimes"))
  for mode in modes:
    if mode not in MODES:
      raise ValueError(f"--modes: unknown mode {mode!r}; the study compares {', '.join(MODES)}")
  batch_sizes, seeds = _ints("batch_sizes"), _ints("seeds")
  siglip = _flag("siglip_batch")
  siglip = min(batch_sizes) if siglip is None else int(siglip)
  warmup = _flag("warmup_fraction")
  if warmup is None:
    warmup = base.schedule.warmup_steps / base.total_steps
  lr = base.lr if _flag("lr") is None else float(_flag("lr"))
  samples = int(_flag("samples"))
  settings = {"base_config": json.loads(base.to_json_best_effort(sort_keys=True)),
              "samples": samples, "warmup_fraction": warmup, "lr": lr}
  runs = grid(modes, batch_sizes, regimes, seeds, siglip)
  configs = {run: run_config(base, run, samples, warmup, lr) for run in runs}
  for config in configs.values():  # every run's config is checked before any trains
    config_lib.validate(config)
  check_settings(out, settings)
  failed = []
  if not FLAGS.report_only:
    _compile_cache(out)
    _, failed = run_study(out, runs, configs, keep_checkpoints=FLAGS.keep_checkpoints)
  results = [r for r in (read_result(fs.join(out, "runs", run.name)) for run in runs) if r]
  paths = study_report.write(out, results, modes=modes, batch_sizes=batch_sizes,
                             regimes=regimes, metrics=FLAGS.metrics, settings=settings,
                             runs_expected=len(runs))
  print(f"[study] {len(results)}/{len(runs)} runs in the report: " + ", ".join(paths))
  if failed:
    sys.exit(f"Error: {len(failed)} run(s) failed (error.txt in each workdir; run the same "
             f"command again to retry them): {', '.join(failed)}")


def _compile_cache(out: str) -> None:
  """Runs of the same shapes (the seeds, the regimes) reuse each other's compiled programs."""
  path = FLAGS.compile_cache
  if path == "DEFAULT":
    path = "" if os.environ.get("JAX_COMPILATION_CACHE_DIR") else fs.join(out, "jax_cache")
  if path:
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


if __name__ == "__main__":
  define_flags()
  app.run(main)
