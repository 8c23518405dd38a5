"""Counts a user can trust (issue 17 item 4): metrics.jsonl's data/skipped_<reason> follow the
consumed stream — each damaged record once, a damaged shard once per epoch, nothing read
ahead — summed over processes, carried through a resume; with data/records_read and
data/epoch, 'were any good records lost?' has an answer."""
import json
import os
import subprocess

import jax.numpy as jnp
import numpy as np

from superclip_jax import train, train_step
from superclip_jax.data import bad_records
from tests import cpu_devices
from tests.test_input_pipeline import _good, _image, _write_tar
from tests.test_main import _tiny_demo_config

# What one pass over `_damaged_shards` skips, by reason.
PER_EPOCH = {"bad_image": 2, "caption_not_utf8": 1, "missing_caption": 1, "missing_image": 1,
             "truncated_shard": 2, "corrupt_shard": 1}
GOOD = 24  # good records in one pass: 3 global batches of 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _damaged_shards(root):
  """6 shards, 24 good records and PER_EPOCH damage. Shard 5 is the longest and all good, so
  read 6 at a time without shuffling, each pass ends with its good records and the
  damage of a pass all lies before the pass's last good record."""
  root.mkdir()
  shards = [[], [], [], None, None, []]
  for r in range(4):
    shards[0] += _good(f"a{r}", r)
    shards[1] += _good(f"b{r}", 10 + r)
  shards[0] += [("a_zero.jpg", b""), ("a_zero.txt", b"photo a_zero")]  # bad_image
  shards[0] += [("a_utf.png", _image(5)), ("a_utf.txt", b"photo \xff\xfe")]  # not UTF-8
  shards[0] += _good("a9", 9)
  shards[1] += [("b_nocap.png", _image(15))]  # missing_caption
  shards[1] += [("b_junk.jpg", b"not a jpeg"), ("b_junk.txt", b"photo b_junk")]  # bad_image
  shards[1] += [("b_noimg.txt", b"photo b_noimg"), ("b_noimg.json", b"{}")]  # missing_image
  shards[1] += _good("b9", 19)
  shards[2] = [m for r in range(3) for m in _good(f"c{r}", 20 + r)]
  shards[5] = [m for r in range(11) for m in _good(f"f{r}", 30 + r)]
  for i, members in enumerate(shards):
    if members is not None:
      _write_tar(str(root / f"{i}.tar"), members)
  big = _image(7, "PNG", (200, 200))  # shard 2 ends inside this member: truncated_shard
  offsets = _write_tar(str(root / "2.tar"), shards[2] + [("c_cut.png", big)])
  with open(root / "2.tar", "r+b") as f:
    f.truncate(offsets["c_cut.png"] + 512 + len(big) // 2)
  (root / "3.tar").write_bytes(np.random.default_rng(0).bytes(3000))  # corrupt_shard
  (root / "4.tar").write_bytes(b"")  # an empty file: truncated_shard
  return f"wds:{root}/{{0..5}}.tar"


def _config(data, total_steps):
  c = _tiny_demo_config(total_steps)
  c.input.data = data
  c.input.cycle_length = 6  # one position group per pass
  c.input.shuffle_buffer = 1
  c.log_training_steps = 1
  return c


def _train_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _skipped(record):
  return {k[len("data/skipped_"):]: v for k, v in record.items()
          if k.startswith("data/skipped_")}


def test_counts_are_exact_per_epoch_and_survive_a_resume(tmp_path):
  data = _damaged_shards(tmp_path / "shards")
  steps = 2 * GOOD // 8  # two passes
  full = str(tmp_path / "full")
  train.train_and_evaluate(_config(data, steps), full)
  records = _train_records(full)
  assert sorted(records) == list(range(1, steps + 1))
  one_pass = records[GOOD // 8]
  # After one pass, exactly one pass's damage, though the input had read ahead into the next;
  # the empty and the corrupt shard once each.
  assert _skipped(one_pass) == PER_EPOCH
  assert one_pass["data/skipped"] == sum(PER_EPOCH.values())
  assert one_pass["data/records_read"] == GOOD and one_pass["data/epoch"] == 0
  assert one_pass["data/records_read_epoch0"] == GOOD and "data/records_read_epoch1" not in one_pass
  last = records[steps]
  assert _skipped(last) == {k: 2 * n for k, n in PER_EPOCH.items()}
  assert last["data/records_read"] == 2 * GOOD and last["data/epoch"] == 1
  # Every good record once per epoch: no good record lost, none read twice.
  assert last["data/records_read_epoch0"] == last["data/records_read_epoch1"] == GOOD
  assert records[1]["data/records_read"] == 8 and records[1]["data/skipped"] < 8

  # Stopped inside the second pass and resumed: the same counts at every later step.
  resumed = str(tmp_path / "resumed")
  train.train_and_evaluate(_config(data, steps), resumed, stop_after=4)
  train.train_and_evaluate(_config(data, steps), resumed)
  again = _train_records(resumed)
  for step in range(4, steps + 1):
    for key in ("data/skipped", "data/records_read", "data/epoch", "data/records_read_epoch0",
                "data/records_read_epoch1"):
      assert again[step].get(key) == records[step].get(key), (step, key)
    assert _skipped(again[step]) == _skipped(records[step]), step



def test_records_per_epoch_follow_each_row():
  """The step's per-source epoch rows, and the host's per-epoch counts from them, against a
  count of every row (a numpy reference), through batches that mix several epochs (a shuffle
  buffer, processes a few passes apart) and a mixture whose sources turn their epochs at
  other times."""
  rng = np.random.default_rng(0)
  counts, expected = bad_records.DataCounts(batch_size=16), {}
  epoch = np.zeros(2, int)
  for step in range(1, 61):
    source = rng.integers(0, 2, 16)
    epoch += rng.random(2) < 0.3  # a source turns its epoch now and then...
    # ...and other rows of the batch are still from earlier ones (at most 7 back: 8 bins).
    rows_epoch = np.maximum(epoch[source] - rng.integers(0, 8, 16) * (rng.random(16) < 0.3), 0)
    for s, e in zip(source, rows_epoch):
      expected[(int(s), int(e))] = expected.get((int(s), int(e)), 0) + 1
    rows = np.asarray(train_step.epoch_rows(jnp.asarray(source), jnp.asarray(rows_epoch), 2))
    counts.update([{"data_skipped": np.zeros(len(bad_records.REASONS), int),
                    "data_epoch": rows[0, 0], "data_epoch_rows": rows}], step)
  logged = counts.metrics()
  for (s, e), n in expected.items():
    key = f"data/records_read_epoch{e}" if s == 0 else f"data/source{s}/records_read_epoch{e}"
    if e > max(k[1] for k in expected if k[0] == s) - bad_records.KEEP_EPOCHS:
      assert logged[key] == n, key
    else:
      assert key not in logged, key
  restored = bad_records.DataCounts(16, step=40, metadata=json.loads(json.dumps(counts.metadata())))
  assert restored.metrics() == logged
  # A checkpoint from before per-pass counts, resumed mid-pass: the pass it resumed in is not
  # logged (its count would start at 0 and read as lost records); the next one is, in full.
  old = bad_records.DataCounts(16, step=10, metadata={"data_records_read": 160, "data_epoch": 2})
  rows = np.asarray(train_step.epoch_rows(jnp.asarray([0] * 16), jnp.asarray([2] * 6 + [3] * 10),
                                          1))
  old.update([{"data_skipped": np.zeros(len(bad_records.REASONS), int), "data_epoch": 3,
               "data_epoch_rows": rows}], 11)
  assert old.metrics()["data/records_read_epoch3"] == 10
  assert "data/records_read_epoch2" not in old.metrics()


def test_two_processes_sum_their_counts(tmp_path):
  """2 processes (jax.distributed over gloo), each reading its own shards: metrics.jsonl's
  counts are the sum over both, each record once. Four shards built alike (4 good records, a
  junk image and a record without caption before the last good one), read 2 per process, so
  each process ends a pass every 2 steps of a global batch of 8, having skipped 2 + 2."""
  root = tmp_path / "shards"
  root.mkdir()
  for s in range(4):
    members = [m for r in range(3) for m in _good(f"s{s}r{r}", 10 * s + r)]
    members += [(f"s{s}junk.jpg", b"not a jpeg"), (f"s{s}junk.txt", b"photo junk")]
    members += [(f"s{s}nocap.png", _image(10 * s + 5))]
    members += _good(f"s{s}r9", 10 * s + 9)
    _write_tar(str(root / f"{s}.tar"), members)
  workdir = str(tmp_path / "two")
  flags = [f"--workdir={workdir}", "--config=configs/demo.py:evals=none",
           "--config.model.variant=mu/8", "--config.model.image_size=32",
           "--config.input.batch_size=8", f"--config.input.data=wds:{root}/{{0..3}}.tar",
           "--config.input.cycle_length=4", "--config.input.shuffle_buffer=1",
           "--config.total_steps=4", "--config.log_training_steps=1", "--config.ckpt_steps=4"]
  r = subprocess.run(["bash", "launch/local_processes.sh", "2", *flags], cwd=REPO,
                     env=cpu_devices.env(1, cached=True), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  records = _train_records(workdir)
  assert sorted(records) == [1, 2, 3, 4]
  for passes, step in ((1, 2), (2, 4)):  # both processes' passes, summed
    assert _skipped(records[step]) == {"bad_image": 2 * 2 * passes,
                                       "missing_caption": 2 * 2 * passes}, step
    assert records[step]["data/records_read"] == 16 * passes
    assert records[step][f"data/records_read_epoch{passes - 1}"] == 16
