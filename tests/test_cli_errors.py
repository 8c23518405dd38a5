"""Bad workdirs, configs and signals at start-up: one `Error:` line naming the path or field,
never a traceback; SIGTERM during start-up exits 0 with the lock released (issue 33 §7)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = [sys.executable, "-m", "superclip_jax.main", "--config=configs/demo.py:evals=none",
        "--config.model.variant=mu/8", "--config.model.image_size=32",
        "--config.input.batch_size=8", "--config.total_steps=2"]
READ_ONLY = "/sys/kernel"  # sysfs: no user, root included, creates a file there


def _main(workdir, *flags):
  return subprocess.run([*MAIN, f"--workdir={workdir}", *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=cpu_devices.compile_cache(os.environ))


def _one_error_line(result):
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: "), result.stderr[-2000:]
  return last


def _write_lease(workdir, pid):
  os.makedirs(workdir, exist_ok=True)
  now = time.time()
  with open(os.path.join(workdir, "train.lock"), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": pid, "start": now, "refreshed": now,
               "token": "held-by-the-test"}, f)


def test_unusable_workdirs_are_one_line_errors_naming_the_path(tmp_path):
  assert os.path.isdir(READ_ONLY) and not os.access(READ_ONLY, os.W_OK) or os.geteuid() == 0
  a_file = tmp_path / "a_file"
  a_file.write_text("not a workdir")
  cases = {
      str(a_file): f"--workdir={a_file} is a file, not a directory",
      f"{READ_ONLY}/superclip_workdir": f"--workdir={READ_ONLY}/superclip_workdir cannot be "
                                        "created",
      READ_ONLY: f"--workdir={READ_ONLY} is not writable: creating {READ_ONLY}/train.lock",
  }
  for workdir, expected in cases.items():
    assert expected in _one_error_line(_main(workdir)), workdir
  assert a_file.read_text() == "not a workdir"


def test_a_truncated_config_json_is_named(tmp_path):
  damaged = '{\n  "accum_steps": 1,\n  "ckpt_'
  (tmp_path / "config.json").write_text(damaged)
  line = _one_error_line(_main(tmp_path))
  assert f"{tmp_path}/config.json is not valid JSON" in line and "cut short" in line
  assert (tmp_path / "config.json").read_text() == damaged  # kept as it was, no config.N.json


@pytest.mark.parametrize("template,expected", [
    ("a photo", "template 'a photo' has no '{}' for the class name"),
    ("a {name}", "template 'a {name}' is not a format pattern with one '{}' for the class "
                 "name (KeyError: 'name')"),
    ("{} and {}", "template '{} and {}' is not a format pattern with one '{}' for the class "
                  "name (IndexError"),
])
def test_bad_label_templates_are_named_before_anything_is_written(tmp_path, template, expected):
  line = _one_error_line(_main(tmp_path / "wd", f"--config.input.label_templates=({template!r},)"))
  assert line.startswith(f"Error: config.input.label_templates: {expected}"), line
  assert not (tmp_path / "wd").exists()


def test_a_workdir_held_by_a_live_trainer_is_one_line(tmp_path):
  _write_lease(tmp_path, os.getpid())  # this test process: alive, on this host
  line = _one_error_line(_main(tmp_path))
  assert f"{tmp_path} is in use by a trainer on host" in line and f"pid {os.getpid()}" in line
  assert json.loads((tmp_path / "train.lock").read_text())["token"] == "held-by-the-test"


def test_sigterm_during_start_up_exits_0_and_releases_the_lock(tmp_path):
  proc = subprocess.Popen([*MAIN, f"--workdir={tmp_path}"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=cpu_devices.compile_cache(os.environ))
  lock = tmp_path / "train.lock"
  deadline = time.time() + 120
  while not lock.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert lock.exists(), proc.communicate()[1][-2000:]
  proc.send_signal(signal.SIGTERM)  # before the first step: restoring, building, compiling
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "step 1/2" not in out and "SIGTERM before or after training: stopped" in err
  assert not lock.exists()


def test_templates_are_checked_in_one_place_for_every_command():
  from superclip_jax.data import spec
  from superclip_jax.evaluators import zeroshot
  good = ("a photo of a {}.", "{0}, or {0}", "{{literal}} {}", "a {:>5}")
  assert spec.check_templates(good, "f") == good
  assert spec.check_templates("a {}", "f") == ("a {}",)
  for bad in ("a photo", "{{}}", "{} {}", "{name}", "{1}", "a {", "}"):
    with pytest.raises(ValueError, match=r"^f: template "):
      spec.check_templates((bad,), "f")
  with pytest.raises(ValueError, match="^f is empty"):
    spec.check_templates((), "f")
  with pytest.raises(ValueError, match="^zeroshot templates: template 'a photo' has no"):
    zeroshot.resolve(["cat", "dog"], ["a photo"])


def test_export_on_a_folder_that_is_not_a_workdir_is_one_line(tmp_path):
  """`export`, `evaluate` and `predict` share main's one-line errors (superclip_jax/cli.py)."""
  result = subprocess.run(
      [sys.executable, "-m", "superclip_jax.export", f"--workdir={tmp_path / 'nothing'}",
       "--format=hf", f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  line = _one_error_line(result)
  assert f"{tmp_path}/nothing/config.json not found: is" in line and "a superclip_jax workdir" \
      in line, line
  assert sorted(os.listdir(tmp_path)) == []  # neither the workdir nor --out was made
