"""Entry point: python -m superclip_jax.main --config=configs/demo.py --workdir=DIR"""
# SUPERCLIP_JAX_MALLOC=tuned: glibc reads its malloc settings only when a process starts, so
# reexec() replaces this process with a fresh one that has them. It runs before the imports
# below so that JAX and TensorFlow are loaded once, in the process that keeps running.
if __name__ == "__main__":
  from superclip_jax import host_malloc
  host_malloc.reexec()

import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from superclip_jax import checkpoint, cli, config_lib, distributed, host_malloc, train

config_flags.DEFINE_config_file("config", None, "Config file (get_config); file.py:key=value",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config of the run.")
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax is chatty at INFO; progress goes to stdout
    logging.set_verbosity(logging.WARNING)
    checkpoint.orbax_errors_in_one_line()
  if host_malloc.active():
    logging.info("glibc malloc tuned for XLA:CPU (%s=tuned; docs/training.md)", host_malloc.OPT_IN)
  signal.signal(signal.SIGTERM, _stop_starting)  # the train loop's own handler takes over
  try:
    distributed.initialize_from_flags()
    if jax.process_index() == 0:  # shown at any verbosity, like the other start-up facts
      for line in config_lib.eval_data_warnings(FLAGS.config):
        print(f"Warning: {line}", flush=True)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except _Stopped:
    # Unwound (the lock is released); the interpreter's own teardown is skipped, because
    # threads that start-up left half-built (tf.data, XLA) can crash it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
  except (*cli.ERRORS, checkpoint.CheckpointSaveError) as e:
    # Our own checks say what to change: their message, not the traceback in front of it
    # (which any --verbosity shows).
    if FLAGS["verbosity"].present or not cli.raised_here(e):
      raise
    cli.exit_with(e)


def _stop_starting(signum, frame):
  """SIGTERM before the train loop handles it (start-up: restore, compile) or after its last
  save: leave now through every `finally`, so the workdir lock is released, with status 0 as
  a stopped run whose checkpoints are all in place."""
  del frame
  print(f"{signal.Signals(signum).name} before or after training: stopped; the workdir's "
        "checkpoints are as they were, and the same command resumes", file=sys.stderr,
        flush=True)
  raise _Stopped(0)


class _Stopped(SystemExit):
  """Raised by `_stop_starting`: a BaseException, so no `except Exception` stops it."""


if __name__ == "__main__":
  app.run(main)
