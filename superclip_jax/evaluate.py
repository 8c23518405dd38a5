"""Runs the configured evaluators on a checkpoint, logging as training does.

  python -m superclip_jax.evaluate --workdir=DIR                     # the run's own evals
  python -m superclip_jax.evaluate --config=configs/b16.py --workdir=DIR --step=20000
  python -m superclip_jax.evaluate --workdir=DIR --evals=zeroshot_imagenet
  MODULE=superclip_jax.evaluate launch/local_processes.sh 2 --workdir=DIR   # 2 processes

On a multi-host Cloud TPU slice or SLURM job, run it on every host, as training runs: the
processes join through jax.distributed (automatic there; elsewhere the same
--coordinator_address/--num_processes/--process_id flags as training) and share the work.

The model comes from the workdir (its config.json and checkpoint, the latest unless --step);
`--config` (default: the workdir's config) supplies `evals`, `mesh` and nothing that would
change the model. Results go to DIR/metrics.jsonl, TensorBoard and stdout as
'{eval name}/{metric}' at the checkpoint's step, exactly like evaluations during training.
"""
from __future__ import annotations

if __name__ == "__main__":  # SUPERCLIP_JAX_MALLOC=tuned: see host_malloc
  from superclip_jax import host_malloc
  host_malloc.reexec()

import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from superclip_jax import (checkpoint, cli, config_lib, distributed, evaluators, metrics_log,
                           models, sharding)
from superclip_jax.evaluators import summary

# Model fields that may differ between the training config and the eval config.
_FREE_MODEL_FIELDS = ("dtype", "remat_policy", "patch_dropout")


def check_same_model(saved, given) -> None:
  """Raises if `given.model` would build another model than the checkpoint's `saved.model`."""
  a, b = saved.model.to_dict(), given.model.to_dict()
  diff = sorted(k for k in set(a) | set(b)
                if k not in _FREE_MODEL_FIELDS and a.get(k) != b.get(k))
  if diff:
    raise ValueError("--config describes another model than the checkpoint: "
                     + ", ".join(f"model.{k}={b.get(k)!r} (checkpoint: {a.get(k)!r})"
                                 for k in diff)
                     + ". Use the run's config (omit --config) or one with the same model.")


def evaluate(workdir: str, config=None, step: int | None = None, names=None) -> dict:
  """Runs `config.evals` (or those in `names`) on a checkpoint; returns {name/metric: value}."""
  saved = checkpoint.read_config(workdir)
  config = saved if config is None else config
  check_same_model(saved, config)
  config_lib.check_evals(config, names)  # an unset eval data path: named, before any loading
  if jax.process_index() == 0:  # shown at any verbosity, as training shows it
    for line in config_lib.eval_data_warnings(config, names, train_data=saved.input.data):
      print(f"Warning: {line}", flush=True)
  mesh = sharding.make_mesh(config.mesh)
  _, _, state = checkpoint.load_state(workdir, step, mesh=mesh)
  evals = evaluators.build(config, models.model_from_config(config.model), mesh, names)
  if not evals:
    raise ValueError("config.evals is empty: nothing to evaluate (pass --config with evals)")
  step = int(state.step)
  logger = metrics_log.MetricLogger(workdir, config.total_steps, config.input.batch_size)
  results, final = {}, []
  try:
    for name, _, evaluator in evals:
      t0 = time.monotonic()
      raw = evaluator.run(state.params)
      metrics = {f"{name}/{k}": v for k, v in raw.items()}
      metrics[f"{name}/seconds"] = time.monotonic() - t0
      logger.write(step, metrics)
      results.update(metrics)
      final.append((name, evaluator, raw))
  finally:
    logger.close()
  summary.report(step, int(state.examples_seen.value()), final)
  return results


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()  # a pod's hosts evaluate together, as in training
  evaluate(flags.FLAGS.workdir, flags.FLAGS.config, flags.FLAGS.step, flags.FLAGS.evals)


def define_flags():
  """Flags of the command (defined only when run as one, so the module imports anywhere)."""
  config_flags.DEFINE_config_file("config", None, "Config file whose `evals` to run (default: "
                                  "the workdir's config.json)", lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's directory (config.json + checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_list("evals", None, "Run only these entries of config.evals.")
  distributed.define_flags()
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  define_flags()
  app.run(cli.one_line_errors(main))
