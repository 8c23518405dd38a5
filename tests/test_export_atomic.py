"""An export is one unit: a killed or mixed one is refused by loaders, never loaded as a mix.

issue 33 §3: SIGKILL during an `hf` re-export left model.safetensors of the new step beside
superclip_head.safetensors of the old one, and init_from loaded the pair without a word.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from superclip_jax import convert
from superclip_jax import export
from superclip_jax import export_dir
from superclip_jax import fs
from tests.test_export import assert_params_equal
from tests.test_export import random_params
from tests.test_export import tiny

MODEL = tiny()
A, B = random_params(MODEL, seed=0), random_params(MODEL, seed=1)
REPO = pathlib.Path(__file__).parent.parent


def load(out):
  return convert.load_torch_checkpoint(out, MODEL, A)


def manifest(out):
  return json.loads((out / export_dir.MANIFEST).read_text())


def test_the_mix_of_the_issue_is_refused_naming_the_file(tmp_path, caplog):
  out, old = tmp_path / "out", tmp_path / "step1"
  export.write_export(A, MODEL, "hf", out, step=1)
  shutil.copytree(out, old)
  export.write_export(B, MODEL, "hf", out, step=2)
  shutil.copy(old / "superclip_head.safetensors", out / "superclip_head.safetensors")
  with pytest.raises(export_dir.ExportManifestError,
                     match=r"superclip_head.safetensors is not the file the hf export of step "
                           r"2 wrote .*re-run the export into"):
    load(out)
  # Without the manifest (a folder of an older version) the mix loads, as it did: B's towers
  # with A's head, and a warning now says that nothing shows the two are from one export.
  (out / export_dir.MANIFEST).unlink()
  with caplog.at_level(logging.WARNING):
    mixed = load(out)
  assert f"{out} has no {export_dir.MANIFEST}" in caplog.text
  np.testing.assert_array_equal(mixed["class_head"]["dense"]["kernel"],
                                A["class_head"]["dense"]["kernel"])
  np.testing.assert_array_equal(mixed["visual"]["conv1"]["kernel"], B["visual"]["conv1"]["kernel"])


def test_a_write_failing_while_staging_leaves_the_old_export_whole(tmp_path, monkeypatch):
  out = tmp_path / "out"
  export.write_export(A, MODEL, "hf", out, step=1)
  write_bytes, calls = fs.write_bytes, []

  def fail_after_one(path, data):
    calls.append(path)
    if len(calls) > 1:
      raise OSError("disk full")
    write_bytes(path, data)

  monkeypatch.setattr(fs, "write_bytes", fail_after_one)
  with pytest.raises(OSError, match="disk full"):
    export.write_export(B, MODEL, "hf", out, step=2)
  monkeypatch.undo()
  assert manifest(out)["step"] == 1
  assert not [n for n in os.listdir(out) if n.startswith(export_dir.STAGING_PREFIX)]
  assert_params_equal(load(out), A)


def _export_killed(out, seed, when):
  """Exports random_params(seed) to `out` in a subprocess that SIGKILLs itself `when`:
  'staging' (at its second staged file) or 'moving' (at its second rename into `out`)."""
  script = textwrap.dedent(f"""
      import os, signal
      from superclip_jax import export, fs
      from tests.test_export import random_params, tiny
      model, out, calls = tiny(), {str(out)!r}, []
      def kill_at_second(*args):
        calls.append(args)
        if len(calls) == 2:
          os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
      if {when!r} == 'staging':
        real, fs.write_bytes = fs.write_bytes, kill_at_second
      else:
        replace = os.replace
        def real(src, dst):
          return replace(src, dst)
        def moving(src, dst):
          if os.path.dirname(dst) == out and not dst.endswith('export_manifest.json'):
            return kill_at_second(src, dst)
          return replace(src, dst)
        os.replace = moving
      export.write_export(random_params(model, {seed}), model, 'hf', out, step={seed + 1})
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
  assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def test_sigkill_while_staging_leaves_the_old_export_loadable(tmp_path):
  out = tmp_path / "out"
  export.write_export(A, MODEL, "hf", out, step=1)
  _export_killed(out, seed=1, when="staging")
  assert [n for n in os.listdir(out) if n.startswith(export_dir.STAGING_PREFIX)]  # left behind
  assert_params_equal(load(out), A)
  export.write_export(B, MODEL, "hf", out, step=2)  # and the next export clears it away
  assert not [n for n in os.listdir(out) if n.startswith(export_dir.STAGING_PREFIX)]
  assert_params_equal(load(out), B)


def test_sigkill_while_moving_into_place_is_refused(tmp_path):
  out = tmp_path / "out"
  export.write_export(A, MODEL, "hf", out, step=1)
  _export_killed(out, seed=1, when="moving")
  assert manifest(out)["complete"] is False
  with pytest.raises(export_dir.ExportManifestError,
                     match=f"{out} holds an unfinished export .*step 2.*re-run the export"):
    load(out)


def test_an_interrupted_upload_to_an_object_store_is_refused(monkeypatch):
  """gs:// has no rename: files go straight into OUT, the manifest last (ram:// here)."""
  pytest.importorskip("tensorflow")
  out = "ram://bucket/atomic_export"
  export.write_export(A, MODEL, "hf", out, step=1)
  write_bytes, calls = fs.write_bytes, []

  def fail_after_one(path, data):
    calls.append(path)
    if len(calls) > 2:  # the in-progress manifest, then one file
      raise OSError("connection reset")
    write_bytes(path, data)

  monkeypatch.setattr(fs, "write_bytes", fail_after_one)
  with pytest.raises(OSError, match="connection reset"):
    export.write_export(B, MODEL, "hf", out, step=2)
  monkeypatch.undo()
  with pytest.raises(export_dir.ExportManifestError, match="unfinished export"):
    load(out)
  export.write_export(B, MODEL, "hf", out, step=2)
  assert_params_equal(load(out), B)


def test_a_clean_reexport_loads_and_its_manifest_matches_the_files(tmp_path):
  out = tmp_path / "out"
  export.write_export(A, MODEL, "hf", out, step=1)
  written = export.write_export(B, MODEL, "hf", out, step=2)
  assert_params_equal(load(out), B)
  got = manifest(out)
  assert (got["format"], got["step"], got["complete"]) == ("hf", 2, True)
  names = sorted(os.listdir(out))
  assert sorted(got["files"]) == sorted(n for n in names if n != export_dir.MANIFEST)
  assert sorted(written) == sorted(str(out / n) for n in got["files"])
  for name, entry in got["files"].items():
    data = (out / name).read_bytes()
    assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
  # A file the loader does not read is checked by its size.
  with open(out / "vocab.json", "a") as f:
    f.write(" ")
  with pytest.raises(export_dir.ExportManifestError, match=r"vocab.json has [\d,]+ bytes"):
    load(out)


def test_a_folder_without_manifest_loads_as_before(tmp_path, caplog):
  """An OpenCLIP download (no manifest, no head side file) loads without a word."""
  out = tmp_path / "openclip"
  export.write_export(A, MODEL, "openclip", out, step=1)
  (out / export_dir.MANIFEST).unlink()
  with caplog.at_level(logging.WARNING):
    got = load(out)
  assert export_dir.MANIFEST not in caplog.text
  np.testing.assert_array_equal(got["visual"]["conv1"]["kernel"], A["visual"]["conv1"]["kernel"])
