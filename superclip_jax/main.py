"""Entry point: python -m superclip_jax.main --config=configs/demo.py --workdir=DIR"""
# SUPERCLIP_JAX_MALLOC=tuned: glibc reads its malloc settings only when a process starts, so
# reexec() replaces this process with a fresh one that has them. It runs before the imports
# below so that JAX and TensorFlow are loaded once, in the process that keeps running.
if __name__ == "__main__":
  from superclip_jax import host_malloc
  host_malloc.reexec()

from absl import app, flags, logging
from ml_collections import config_flags

from superclip_jax import distributed, host_malloc, train

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
  if host_malloc.active():
    logging.info("glibc malloc tuned for XLA:CPU (%s=tuned; docs/training.md)", host_malloc.OPT_IN)
  distributed.initialize_from_flags()
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
