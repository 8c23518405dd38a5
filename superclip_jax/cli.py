"""What the commands (train, export, evaluate, predict) do with an error of our own checks:
one `Error:` line naming the path or field and what to do, status 1, no traceback.

An exception raised by this package's code (its innermost frame is ours) is such a check;
anything raised deeper (XLA, Orbax, TensorFlow) keeps its traceback, as does every error
under an explicit --verbosity.
"""
from __future__ import annotations

import functools
import os
import sys

from absl import flags

from superclip_jax import workdir_lock

ERRORS = (ValueError, FileNotFoundError, FileExistsError, workdir_lock.WorkdirLockedError)


def one_line_errors(main, errors=ERRORS):
  """Wraps an absl `main(argv)`."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except errors as e:
      if flags.FLAGS["verbosity"].present or not raised_here(e):
        raise
      exit_with(e)
  return wrapped


def exit_with(error: BaseException) -> None:
  """Prints `Error: <message>` and ends the process with status 1 once the stack has unwound
  (locks released, checkpointers closed). The interpreter's teardown is skipped: an Orbax or
  tf.data thread that outlives its owner can otherwise print after the Error: line."""
  print(f"Error: {error}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)


def raised_here(error: BaseException) -> bool:
  """Whether `error` was raised by this package's code (its innermost frame is ours)."""
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(
      os.path.dirname(os.path.abspath(__file__)) + os.sep)
