#!/usr/bin/env python3
"""Train on a Cloud TPU slice (or several: multislice) from your machine, through `gcloud`.

  python launch/tpu.py --name=clip --zone=us-east5-a create --accelerator-type=v5p-128 --spot
  python launch/tpu.py --name=clip --zone=us-east5-a setup
  python launch/tpu.py --name=clip --zone=us-east5-a run --config=configs/b16.py \\
      --workdir=gs://BUCKET/runs/b16 -- --config.input.data='wds:gs://BUCKET/shards/{00000..04095}.tar'
  python launch/tpu.py --name=clip --zone=us-east5-a watch --accelerator-type=v5p-128 --spot \\
      --config=configs/b16.py --workdir=gs://BUCKET/runs/b16 -- ...   # all of the above, and again
                                                                      # after every preemption
Commands: create, setup, run, status, logs, ssh, delete, watch. `--dry-run` prints the commands
(one per line, shell-quoted) instead of running them. Everything is a queued resource named
--name (its one node is named the same; with --node-count=N>1 gcloud names N nodes), reached
with `gcloud compute tpus queued-resources ssh/scp --node=all --worker=all`. Workers never need
this repository: `setup` copies a wheel built here plus the configs/ folder to
~/superclip_jax_launch on every worker and installs the wheel with its `[tpu,gcs]` extras
(jax[tpu]; google-cloud-storage for gs:// workdirs) into a Python 3.11 venv there (uv; the
TPU images' own Python is 3.10). Before `create` (and `watch`) asks for a slice, the train step
of --config is compiled for it here by superclip_jax/plan.py, and a config that does not fit
the chips' memory stops the launch with the numbers (--skip-plan skips the check; a dry run
prints the plan). docs/launch.md has the walk-through. Standard library only (the plan runs in
a subprocess): runs wherever gcloud does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "superclip_jax_launch"  # under each worker's home: wheel, configs/, venv/, logs/
# The software image (runtime version) per TPU generation, for JAX (Cloud TPU docs).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# Queued-resource and node states after which the slice is gone: delete, create, start again.
LOST = {"FAILED", "SUSPENDING", "SUSPENDED", "PREEMPTED", "TERMINATED"}
MAX_POLL_SECONDS = 3600


class Shell:
  """Runs commands, or with dry_run prints them (one line each, shell-quoted) and runs nothing."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def note(self, text: str) -> None:
    print(f"# {text}" if self.dry_run else f"[launch/tpu.py] {text}", flush=True)

  def run(self, cmd: list[str], *, capture: bool = False, check: bool = True):
    if self.dry_run:
      print(shlex.join(cmd), flush=True)
      return subprocess.CompletedProcess(cmd, 0, "", "")
    r = subprocess.run(cmd, text=True, capture_output=capture)
    if check and r.returncode:
      sys.exit(f"launch/tpu.py: `{shlex.join(cmd)}` failed with exit status {r.returncode}"
               + (f":\n{r.stderr.strip()}" if capture and r.stderr else ""))
    return r

  def start(self, cmd: list[str]):
    """A command left running (watch polls beside it); None in a dry run."""
    if self.dry_run:
      print(shlex.join(cmd), flush=True)
      return None
    return subprocess.Popen(cmd)


class Tpu:
  """The gcloud commands for one queued resource."""

  def __init__(self, args, shell: Shell):
    self.args, self.shell = args, shell
    self._stage = self._wheel_name = None  # set by wheel()
    self._planned = False  # check_plan ran

  def _gcloud(self, *words: str, track: str | None = None) -> list[str]:
    cmd = [os.environ.get("GCLOUD", "gcloud"), *([track] if track else []), "compute", "tpus",
           *words, f"--zone={self.args.zone}"]
    return cmd + ([f"--project={self.args.project}"] if self.args.project else [])

  def _on_all(self, verb: str, *words: str) -> list[str]:
    # --batch-size=all: gcloud otherwise runs on 64 workers at a time, and a long command on
    # the first 64 would keep the others from starting.
    return self._gcloud("queued-resources", verb, *words, "--node=all", "--worker=all",
                        "--batch-size=all")

  def state(self) -> str:
    """The queued resource's state, or '' if there is none."""
    r = self.shell.run(self._gcloud("queued-resources", "describe", self.args.name,
                                    "--format=value(state.state)"), capture=True, check=False)
    if r.returncode:
      if re.search(r"NOT_FOUND|not found|could not be found", r.stderr or "", re.I):
        return ""
      sys.exit(f"launch/tpu.py: cannot read the state of {self.args.name}: {r.stderr.strip()}")
    state = r.stdout.strip()
    if state == "ACTIVE" and self.args.node_count == 1:  # a preempted node before its QR knows
      r = self.shell.run(self._gcloud("tpu-vm", "describe", self.args.name,
                                      "--format=value(state)"), capture=True, check=False)
      if r.returncode == 0 and r.stdout.strip() in LOST:
        state = r.stdout.strip()
    return state

  def check_plan(self) -> None:
    """Compiles the train step of --config for the slice here, before it is paid for
    (superclip_jax/plan.py, with the TPU compiler of the `tpu` extra; no TPU needed), and stops
    with the numbers where it does not fit. Once per launcher run; --skip-plan skips it."""
    a = self.args
    if self._planned or a.skip_plan:
      return
    self._planned = True
    config = getattr(a, "config", None)
    if not config:
      self.shell.note("no --config: the train step is not planned for the slice (give --config "
                      "to check that it fits first)")
      return
    overrides = [w for w in getattr(a, "trainer_args", []) if w.startswith("--config.")]
    where = a.accelerator_type + (f" x {a.node_count} slices" if a.node_count > 1 else "")
    self.shell.note(f"planning {config} on {where}: compiling its train step here (minutes for "
                    "a large slice; --skip-plan skips this)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "plan.json")
      r = subprocess.run([sys.executable, "-m", "superclip_jax.plan", f"--config={config}",
                          *overrides, f"--topology={a.accelerator_type}",
                          f"--slices={a.node_count}", f"--json_out={out}"],
                         capture_output=True, text=True, env=env)
      result = json.load(open(out)) if r.returncode in (0, 2) and os.path.exists(out) else None
    if result is None:
      last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
      cannot = "not installed" in last or "ModuleNotFoundError" in last
      if cannot and self.shell.dry_run:
        self.shell.note(f"not planned: {last}")
        return
      hint = (" (install the plan's compiler here: pip install -e '.[tpu]', Python 3.12)"
              if cannot else "")
      sys.exit(f"launch/tpu.py: planning {config} on {where} failed: {last}{hint}; "
               "--skip-plan creates the slice without the check")
    for line in r.stdout.splitlines():
      if line.startswith("|") and self.shell.dry_run:
        self.shell.note(line)
    gib = lambda n: f"{n / (1 << 30):.2f}"
    at = f"at {result['batch_per_chip']} pairs per chip"
    if result["fits"]:
      self.shell.note(f"plan: {config} fits {where}: {gib(result['total_bytes'])} GiB per chip "
                      f"of {gib(result['hbm_bytes'])} GiB HBM {at}")
      return
    if result["compiled"]:
      why = (f"{gib(result['total_bytes'])} GiB per chip of {gib(result['hbm_bytes'])} GiB HBM "
             f"(arguments {gib(result['argument_bytes'])}, temporaries "
             f"{gib(result['temp_bytes'])})")
    else:
      why = (f"the TPU compiler refused its train step: {result['refused_for']} need "
             f"{gib(result['temp_bytes'])} GiB per chip, {gib(result['available_bytes'])} GiB "
             "available")
    sys.exit(f"launch/tpu.py: {config} does not fit {where}: {why} {at}; shard more "
             "(mesh.fsdp), remat (model.remat_policy), fewer pairs per chip with accum_steps, "
             "or a larger slice (--skip-plan creates it anyway)")

  def create(self) -> None:
    self.check_plan()
    a = self.args
    tier = [flag for flag, on in (("--spot", a.spot), ("--reserved", a.reserved),
                                  ("--best-effort", a.best_effort)) if on]
    nodes = [f"--node-count={a.node_count}"] if a.node_count > 1 else [f"--node-id={a.name}"]
    # --best-effort exists only in gcloud's alpha track.
    cmd = self._gcloud("queued-resources", "create", a.name,
                       f"--accelerator-type={a.accelerator_type}",
                       f"--runtime-version={runtime_version(a)}", *nodes, *tier,
                       track="alpha" if a.best_effort else None)
    if self.shell.dry_run:
      self.state()
      self.shell.note("if the describe above finds no queued resource:")
      self.shell.run(cmd)
      return
    state = self.state()
    if state:
      self.shell.note(f"queued resource {a.name} exists ({state}): not created again")
      return
    self.shell.run(cmd)

  def wheel(self) -> str:
    """Builds the package's wheel here (once per command) and stages it with configs/."""
    if self._stage:
      return self._stage
    a = self.args
    stage = os.path.join(a.stage_dir or os.path.join(tempfile.gettempdir(),
                                                     f"superclip_jax_stage.{a.name}"), REMOTE_DIR)
    name = f"superclip_jax-{package_version()}-py3-none-any.whl"
    if a.wheel:
      if not self.shell.dry_run and not os.path.isfile(a.wheel):
        sys.exit(f"launch/tpu.py: --wheel={a.wheel} is not a file: build one with "
                 f"`python -m pip wheel --no-deps . -w DIR` or leave --wheel out")
      name = os.path.basename(a.wheel)
    self.shell.note(f"stage the wheel and configs/ in {stage}")
    if not self.shell.dry_run:
      shutil.rmtree(stage, ignore_errors=True)
      os.makedirs(stage)
      shutil.copytree(os.path.join(REPO, "configs"), os.path.join(stage, "configs"),
                      ignore=shutil.ignore_patterns("__pycache__"))
    if a.wheel:
      if not self.shell.dry_run:
        shutil.copy(a.wheel, stage)
    else:
      self.shell.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", REPO,
                      "-w", stage])
      if not self.shell.dry_run and not os.path.isfile(os.path.join(stage, name)):
        sys.exit(f"launch/tpu.py: pip wheel did not write {name} into {stage} (setup.py's "
                 f"version changed?): {os.listdir(stage)}")
    self._stage, self._wheel_name = stage, name
    return stage

  def setup(self) -> None:
    stage = self.wheel()
    a = self.args
    self.shell.run(self._on_all("scp", "--recurse", stage, f"{a.name}:"))
    uv = "$HOME/.local/bin/uv"
    install = "; ".join([
        f"cd ~/{REMOTE_DIR} || exit 1",
        "if ! test -x venv/bin/python; then python3 -m pip install --user --quiet uv || "
        "python3 -m pip install --user --quiet --break-system-packages uv || exit 1; "
        f"{uv} venv --python {shlex.quote(a.python)} venv || exit 1; fi",
        f"{uv} pip install --python venv/bin/python --quiet "
        f"{shlex.quote(self._wheel_name + '[tpu,gcs]')} || exit 1",  # gcs: gs:// workdirs
        "venv/bin/python -c 'import jax, superclip_jax; print(\"superclip_jax on\", "
        "jax.__version__)'"])
    self.shell.run(self._on_all("ssh", a.name, f"--command={install}"))

  def run_command(self) -> list[str]:
    """The gcloud command that runs the trainer on every worker of every node."""
    return self._on_all("ssh", self.args.name, f"--command={run_script(self.args)}")

  def run(self) -> int:
    return self.shell.run(self.run_command(), check=False).returncode

  def delete(self) -> None:
    self.shell.run(self._gcloud("queued-resources", "delete", self.args.name, "--force",
                                "--quiet"))


def run_script(a) -> str:
  """The one-line shell script every worker runs: the trainer in the background with its
  output appended to ~/superclip_jax_launch/logs/HOST.log, copied to WORKDIR/logs/HOST.log
  every --log-sync-seconds and at the end, and echoed to this terminal. The trainer is in its
  own session (setsid), so a dropped SSH connection does not stop it; SIGTERM (preemption)
  reaches it directly, not through a pipe that could break while it saves."""
  workdir = a.workdir.rstrip("/")
  if workdir.startswith("gs://"):
    upload = (f'gcloud storage cp --quiet "$log" {shlex.quote(workdir + "/logs/")}"$(hostname)'
              '.log" >/dev/null 2>&1 || true')
  elif "://" in workdir:
    sys.exit(f"launch/tpu.py: --workdir={a.workdir}: logs are copied to gs:// or to a path "
             "every worker shares; use one of those")
  else:
    upload = f"mkdir -p {shlex.quote(workdir + '/logs')} && cp \"$log\" {shlex.quote(workdir)}" \
             "/logs/ || true"
  trainer = shlex.join(["venv/bin/python", "-m", "superclip_jax.main", f"--config={a.config}",
                        f"--workdir={a.workdir}", *a.trainer_args])
  return "; ".join([
      f"cd ~/{REMOTE_DIR} || exit 1", "mkdir -p logs", 'log="$PWD/logs/$(hostname).log"',
      # The terminal is shown this run's part of the log, from the byte it starts at, whenever
      # `tail` gets to open it: the trainer starts (and may write) first, and a log from an
      # earlier run on this worker stays above it.
      ': >>"$log"', 'offset=$(($(wc -c <"$log") + 1))',
      f"upload() {{ {upload}; }}",
      f"(while sleep {a.log_sync_seconds}; do upload; done) & uploader=$!",
      f'setsid nohup {trainer} >>"$log" 2>&1 </dev/null & trainer=$!',
      'tail -c "+$offset" -f --pid="$trainer" "$log" & wait "$trainer"', "rc=$?",
      'kill "$uploader"', "upload", 'echo "superclip_jax.main exited $rc on $(hostname)"',
      'exit "$rc"'])


def package_version() -> str:
  with open(os.path.join(REPO, "setup.py")) as f:
    m = re.search(r"""\bversion\s*=\s*["']([^"']+)["']""", f.read())
  if not m:
    sys.exit("launch/tpu.py: no version=... in setup.py; pass --wheel=PATH")
  return m.group(1)


def runtime_version(a) -> str:
  if a.runtime_version:
    return a.runtime_version
  generation = a.accelerator_type.rsplit("-", 1)[0]
  if generation not in RUNTIME_VERSIONS:
    sys.exit(f"launch/tpu.py: no default --runtime-version for --accelerator-type="
             f"{a.accelerator_type}; pass one (gcloud compute tpus versions list --zone=ZONE)")
  return RUNTIME_VERSIONS[generation]


def watch(tpu: Tpu, shell: Shell) -> int:
  """create → wait for ACTIVE → setup → run, polling the state beside the run; a lost slice
  (preempted, suspended, failed) is deleted and everything starts again with the same workdir,
  which resumes from its latest checkpoint. Ends with the run's exit status; a run that fails
  while its slice stays ACTIVE is a training error, not retried."""
  a = tpu.args
  tpu.check_plan()  # before anything is asked of the cloud
  if shell.dry_run:
    tpu.create()
    shell.note(f"every {a.poll_seconds:g} s, until ACTIVE:")
    tpu.state()
    tpu.setup()
    shell.note(f"runs while the state, polled every {a.poll_seconds:g} s, stays ACTIVE:")
    shell.start(tpu.run_command())
    shell.note(f"on {'/'.join(sorted(LOST))} (at most --max-restarts={a.max_restarts} times): "
               "delete, then all of the above again")
    tpu.delete()
    return 0
  restarts = 0

  def start_again(state: str) -> None:
    nonlocal restarts
    if restarts >= a.max_restarts:
      sys.exit(f"launch/tpu.py: {a.name} is {state} after {restarts} restarts; stopping "
               f"(--max-restarts={a.max_restarts})")
    restarts += 1
    shell.note(f"{a.name} is {state}: deleting it to start again (restart {restarts} of at "
               f"most {a.max_restarts})")
    tpu.delete()

  while True:
    while (state := tpu.state()) != "ACTIVE" and state not in LOST:
      if state:
        shell.note(f"{a.name}: {state}")
      else:  # not there (first time, or after a delete): create is a no-op if it appeared
        tpu.create()
      time.sleep(a.poll_seconds)
    if state in LOST:
      start_again(state)
      continue
    tpu.setup()
    proc = shell.start(tpu.run_command())
    while proc.poll() is None:
      time.sleep(a.poll_seconds)
      if (state := tpu.state()) in LOST:
        proc.terminate()
        proc.wait()
        break
    else:
      if proc.returncode == 0:
        shell.note("the run finished")
        return 0
      time.sleep(a.poll_seconds)  # SSH may see a preemption before the API does
      state = tpu.state()
      if state not in LOST:
        shell.note(f"the run failed (exit {proc.returncode}) while {a.name} is "
                   f"{state or 'gone'}: a training error, not a preemption; not restarting (if "
                   "only the SSH connection dropped, the trainer runs on: see `logs`)")
        return proc.returncode
    start_again(state)


def parse(argv: list[str]):
  """Flags before `--` are the launcher's; everything after is passed to superclip_jax.main."""
  trainer_args = []
  if "--" in argv:
    i = argv.index("--")
    argv, trainer_args = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="the queued resource (and single node) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", help="default: gcloud's configured project")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  shape = argparse.ArgumentParser(add_help=False)
  shape.add_argument("--accelerator-type", required=True, help="e.g. v4-32, v5litepod-256, "
                     "v5p-128: one slice")
  shape.add_argument("--runtime-version", help="default by generation: " + ", ".join(
      f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()))
  shape.add_argument("--node-count", type=int, default=1, help="slices (multislice if > 1)")
  shape.add_argument("--skip-plan", action="store_true", help="create without compiling the "
                     "train step of --config for the slice first (superclip_jax/plan.py)")
  tier = shape.add_mutually_exclusive_group()
  tier.add_argument("--spot", action="store_true", help="Spot VMs (cheap, preemptible)")
  tier.add_argument("--reserved", action="store_true", help="your reservation's capacity")
  tier.add_argument("--best-effort", action="store_true", help="best-effort tier (gcloud alpha)")
  install = argparse.ArgumentParser(add_help=False)
  install.add_argument("--wheel", help="a built superclip_jax wheel (default: build one here)")
  install.add_argument("--stage-dir", help="where to stage the wheel and configs/ (default: "
                       "TMPDIR/superclip_jax_stage.NAME)")
  install.add_argument("--python", default="3.11", help="the workers' venv Python (uv)")
  train = argparse.ArgumentParser(add_help=False)
  train.add_argument("--config", required=True, help="e.g. configs/b16.py (the configs/ folder "
                     "is copied to the workers; a :variant suffix works as usual)")
  train.add_argument("--workdir", required=True, help="gs://BUCKET/PATH (shared by all workers)")
  train.add_argument("--log-sync-seconds", type=int, default=60,
                     help="how often each worker copies its log to WORKDIR/logs/")
  sub = p.add_subparsers(dest="command", required=True)
  create = sub.add_parser("create", parents=[shape], help="request the slice (an existing one "
                          "is kept), once --config's train step is planned to fit it")
  create.add_argument("--config", help="the config to plan for the slice first (as `run` "
                      "takes it)")
  sub.add_parser("setup", parents=[install], help="install the package on every worker")
  sub.add_parser("run", parents=[train], help="train on every worker (flags after --: the "
                 "trainer's)")
  sub.add_parser("status", help="describe the queued resource")
  logs = sub.add_parser("logs", help="the end of one worker's log")
  ssh = sub.add_parser("ssh", help="a shell (or, after --, a command) on one worker")
  for q in (logs, ssh):
    q.add_argument("--node", default="0")
    q.add_argument("--worker", default="0")
  logs.add_argument("--lines", type=int, default=100)
  sub.add_parser("delete", help="delete the queued resource and its nodes")
  w = sub.add_parser("watch", parents=[shape, install, train],
                     help="create, set up and run; again after every preemption")
  w.add_argument("--poll-seconds", type=float, default=60,
                 help=f"state poll interval, (0, {MAX_POLL_SECONDS}]")
  w.add_argument("--max-restarts", type=int, default=10)
  a = p.parse_args(argv)
  a.trainer_args = trainer_args
  if trainer_args and a.command not in ("run", "watch", "ssh"):
    p.error(f"arguments after -- are for run, watch and ssh, not {a.command}")
  if getattr(a, "node_count", 1) < 1:
    p.error(f"--node-count={a.node_count} must be at least 1")
  if a.command == "watch" and not 0 < a.poll_seconds <= MAX_POLL_SECONDS:
    p.error(f"--poll-seconds={a.poll_seconds:g} must be in (0, {MAX_POLL_SECONDS}]")
  if getattr(a, "accelerator_type", None) and not re.fullmatch(r"v\d+[a-z]*-\d+",
                                                               a.accelerator_type):
    p.error(f"--accelerator-type={a.accelerator_type}: expected e.g. v4-32, v5litepod-256")
  if not hasattr(a, "node_count"):
    a.node_count = 1  # (only `state` reads it outside create/watch: a node of the same name)
  return a


def main(argv=None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  shell = Shell(a.dry_run)
  tpu = Tpu(a, shell)
  if a.command == "create":
    tpu.create()
  elif a.command == "setup":
    tpu.setup()
  elif a.command == "run":
    return tpu.run()
  elif a.command == "status":
    shell.run(tpu._gcloud("queued-resources", "describe", a.name))
  elif a.command in ("logs", "ssh"):
    cmd = tpu._gcloud("queued-resources", "ssh", a.name, f"--node={a.node}",
                      f"--worker={a.worker}")
    if a.command == "logs":
      cmd.append(f"--command=tail -n {a.lines} ~/{REMOTE_DIR}/logs/*.log")
    elif a.trainer_args:
      cmd.append(f"--command={shlex.join(a.trainer_args)}")
    return shell.run(cmd, check=False).returncode
  elif a.command == "delete":
    tpu.delete()
  elif a.command == "watch":
    return watch(tpu, shell)
  return 0


if __name__ == "__main__":
  sys.exit(main())
