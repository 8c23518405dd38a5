"""Input that never yields a batch must not hang a run: a source whose records are all skipped
stops with a message naming it and the reasons, and SIGTERM / SIGINT are honoured while the
loop waits for a batch, the first one included (issue 17)."""
import io
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest
from PIL import Image

import tensorflow as tf

from superclip_jax import checkpoint, config_lib, train
from superclip_jax.data import bad_records, input_pipeline
from tests import cpu_devices
from tests.test_main import REPO, TINY, _tiny_demo_config


def _write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _png(i):
  out = io.BytesIO()
  Image.new("RGB", (20, 20), (10 * i, 20, 30)).save(out, "PNG")
  return out.getvalue()


def _config(data, max_consecutive_skips):
  c = config_lib.base_config()
  c.model.image_size = 16
  c.model.context_length = 16
  c.input.batch_size = 4
  c.input.data = data
  c.input.shuffle_buffer = 8
  c.input.max_consecutive_skips = max_consecutive_skips
  return c


def _first_batches(config, n, seconds=120):
  """The first n batches through the training loop's reader; InputStopped if they do not come
  within `seconds` (the input hangs)."""
  deadline = time.monotonic() + seconds
  batches = input_pipeline.host_batches(input_pipeline.train_dataset(config).as_numpy_iterator(),
                                        stop=lambda: time.monotonic() > deadline)
  try:
    return [next(batches) for _ in range(n)]
  finally:
    batches.close()


def test_a_shard_of_undecodable_images_stops_with_the_source_and_reasons(tmp_path):
  garbage = str(tmp_path / "garbage.tar")
  _write_tar(garbage, [m for r in range(20) for m in ((f"{r:03d}.jpg", b"not a jpeg"),
                                                       (f"{r:03d}.txt", b"a caption"))])
  with pytest.raises(bad_records.TooManySkipped) as error:
    _first_batches(_config(f"wds:{garbage}", 100), 1)
  message = str(error.value)
  assert message.startswith(f"wds:{garbage}: ") and "records in a row were skipped" in message
  assert "bad_image=" in message and "max_consecutive_skips=100" in message

  # One good record in 21 is no stall: runs of skips shorter than the limit go on.
  mixed = str(tmp_path / "mixed.tar")
  _write_tar(mixed, [m for r in range(21) for m in (
      (f"{r:03d}.png", _png(r) if r == 0 else b"not a png"), (f"{r:03d}.txt", b"a caption"))])
  assert len(_first_batches(_config(f"wds:{mixed}", 100), 2)) == 2
  # In a mixture, the source with nothing usable is the one named.
  with pytest.raises(bad_records.TooManySkipped, match="^" + re.escape(f"wds:{garbage}: ")):
    _first_batches(_config(f"wds:{mixed};wds:{garbage}", 100), 50)


def _popen_main(workdir, *flags, stderr=subprocess.PIPE):
  cmd = [sys.executable, "-u", "-m", "superclip_jax.main", "--config=configs/demo.py",
         f"--workdir={workdir}", *TINY, *flags]
  # A shell may have started us with SIGINT ignored, which the child would inherit; a handler
  # here becomes SIGINT's default action there.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env=cpu_devices.compile_cache(os.environ))
  finally:
    signal.signal(signal.SIGINT, previous)


def test_a_folder_of_text_files_named_jpg_stops_the_run_with_one_message(tmp_path):
  for cls in ("a", "b"):
    (tmp_path / "data" / cls).mkdir(parents=True)
    for i in range(3):
      (tmp_path / "data" / cls / f"{i}.jpg").write_text("not an image")
  spec = f"folder:{tmp_path / 'data'}"
  proc = _popen_main(str(tmp_path / "run"), f"--config.input.data={spec}",
                     "--config.input.max_consecutive_skips=2000")
  try:
    out, err = proc.communicate(timeout=240)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    pytest.fail("the run neither trained nor stopped: it hangs")
  assert proc.returncode != 0
  assert f"{spec}: " in err and "records in a row were skipped" in err and "bad_image=" in err
  assert "Traceback" not in err, err[-3000:]
  assert f"data: {spec}: 6 files" in out  # the sources, as start-up facts


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_waiting_for_the_first_batch_stops_the_run(tmp_path, signum):
  # Shard 1 is a FIFO no one writes: opening it blocks, so the first batch never comes.
  root = tmp_path / "shards"
  root.mkdir()
  _write_tar(str(root / "0.tar"), [("0.png", _png(0)), ("0.txt", b"a caption")])
  os.mkfifo(str(root / "1.tar"))
  log = open(tmp_path / "stderr.txt", "w+")
  proc = _popen_main(str(tmp_path / "run"), f"--config.input.data=wds:{root}/{{0..1}}.tar",
                     stderr=log)
  started = threading.Event()

  def watch():  # the start-up facts end with the data sources
    for line in proc.stdout:
      if line.startswith("data: "):
        started.set()
  threading.Thread(target=watch, daemon=True).start()
  try:
    started.wait(120)
    time.sleep(3)  # into the wait for the first batch
    proc.send_signal(signum)
    start = time.monotonic()
    proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f"signal {signum!r} was ignored while waiting for input")
  assert time.monotonic() - start < 30
  log.seek(0)
  err = log.read()
  # A preemption, or a first Ctrl-C: leaves cleanly (nothing was trained to save).
  assert proc.returncode == 0, err[-3000:]
  assert "Preempted while waiting for input" in err


def test_sigterm_while_input_stalls_mid_run_saves_the_last_step(tmp_path, monkeypatch):
  """Steps 1-3, then input that does not come: SIGTERM then saves step 3 and returns."""
  real, release = input_pipeline.train_dataset, threading.Event()

  def stalling(config, **kwargs):
    ds = real(config, **kwargs).take(5)  # prefetch_to_device holds two batches in flight

    def wait_for_release():
      release.wait()
      yield from ()
    return ds.concatenate(tf.data.Dataset.from_generator(wait_for_release,
                                                         output_signature=ds.element_spec))

  monkeypatch.setattr(input_pipeline, "train_dataset", stalling)
  workdir = str(tmp_path / "run")
  metrics = os.path.join(workdir, "metrics.jsonl")

  def preempt_after_step_2():  # then step 3 runs, and the loop waits for batch 6
    deadline = time.monotonic() + 300
    while not (os.path.exists(metrics) and '"step": 2' in open(metrics).read()):
      if time.monotonic() > deadline:
        break
      time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)

  config = _tiny_demo_config(100)
  config.log_training_steps, config.ckpt_steps = 1, 1000
  threading.Thread(target=preempt_after_step_2, daemon=True).start()
  try:
    state = train.train_and_evaluate(config, workdir)
  finally:
    release.set()
  assert int(state.step) == 3
  assert checkpoint.Checkpointer(workdir, checkpoint.read_config(workdir)).latest_step() == 3


def test_a_shard_that_never_yields_is_reported_by_name_and_sigterm_path_still_stops(
    tmp_path, caplog):
  good = str(tmp_path / "0.tar")
  _write_tar(good, [m for r in range(8) for m in ((f"{r:03d}.png", _png(r)),
                                                  (f"{r:03d}.txt", b"a caption"))])
  fifo = str(tmp_path / "1.tar")
  os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a stuck mount
  config = _config(f"wds:{tmp_path}/{{0..1}}.tar", 100)
  config.input.cycle_length = 2
  warned = lambda: "Input stalled" in caplog.text  # noqa: E731
  try:
    with caplog.at_level(logging.WARNING):
      batches = input_pipeline.host_batches(
          input_pipeline.train_dataset(config).as_numpy_iterator(), stall_seconds=1.0,
          stop=lambda: warned() and caplog.text.count("Input stalled") >= 2)
      start = time.monotonic()
      with pytest.raises(input_pipeline.InputStopped):
        next(batches)
      assert time.monotonic() - start < 60
  finally:
    def unblock():  # EOF for the stuck reader, so that no thread outlives the test
      with open(fifo, "wb"):
        pass
    threading.Thread(target=unblock, daemon=True).start()
  first = next(r.getMessage() for r in caplog.records if "Input stalled" in r.getMessage())
  assert "no batch for 1 s (waiting for batch 1" in first
  assert f"shards giving no record: wds:{tmp_path}/{{0..1}}.tar: {fifo} (" in first
  assert good not in first
  assert "no batch for 2 s" in caplog.text  # again, each interval
