"""The TPU plan table of docs/performance.md: `superclip_jax.plan` over recipes, slices, batch
sizes and remat policies, each case in its own process (a B/16 compile is 1-8 CPU minutes and
holds several GB), printed as one markdown row per case as it finishes.

  python bench/plan_table.py                     # the cases below
  python bench/plan_table.py --only=0,3 --json_out=plan_rows.jsonl

Needs the TPU compiler (pip install -e '.[tpu]', Python 3.12); no TPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B16_V5E = "configs/b16.py:platform=tpu-v5e-256"
# (config, topology, batch per chip, config overrides)
CASES = [
    ("configs/b16.py", "v5p-8", 256, []),
    ("configs/b16.py:mode=clip", "v5p-8", 256, []),
    (B16_V5E, "v5litepod-4", 64, []),
    (B16_V5E, "v5litepod-4", 256, []),
    (B16_V5E, "v5litepod-4", 256, ["--config.model.remat_policy=dots_with_no_batch_dims_saveable"]),
    ("configs/b16.py", "v5litepod-4", 64, []),
    ("configs/b16.py", "v6e-4", 256, []),
    ("configs/b16.py:variant=L/16", "v5p-8", 256, ["--config.model.remat_policy=full"]),
]


def row(case, result) -> str:
  config, topology, batch, overrides = case
  gib = lambda k: f"{result[k] / (1 << 30):.2f}" if k in result else "-"
  what = config + "".join(" " + o.replace("--config.", "") for o in overrides)
  if result.get("compiled"):
    fits = "fits" if result["fits"] else "does not fit"
  else:
    fits = f"refused: {gib('temp_bytes')} GiB temporaries > {gib('available_bytes')}"
  return (f"| `{what}` | {topology} | {batch} | {gib('argument_bytes')} | {gib('temp_bytes')} "
          f"| {gib('total_bytes')} of {result['hbm_bytes'] / (1 << 30):g} | {fits} "
          f"| {result['model_tflops_per_chip']:.1f} | {result['compile_seconds']:.0f} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", default="", help="comma-separated case indices (default: all)")
  p.add_argument("--json_out", default="", help="append each case's plan here (JSON lines)")
  a = p.parse_args(argv)
  chosen = [int(i) for i in a.only.split(",") if i] or range(len(CASES))
  print("| config | slice | batch/chip | arguments GiB | temporaries GiB | total GiB of HBM "
        "| fits | model TFLOP/chip | compile s |")
  print("|---|---|---|---|---|---|---|---|---|", flush=True)
  for i in chosen:
    config, topology, batch, overrides = CASES[i]
    out = f"/tmp/plan_table_{os.getpid()}_{i}.json"
    r = subprocess.run([sys.executable, "-m", "superclip_jax.plan", f"--config={config}",
                        *overrides, f"--topology={topology}", f"--batch_per_chip={batch}",
                        "--noevals", f"--json_out={out}"], cwd=REPO, capture_output=True,
                       text=True)
    if r.returncode not in (0, 2):
      print(f"| `{config}` | {topology} | {batch} | error: "
            f"{(r.stderr.strip().splitlines() or ['?'])[-1]} |", flush=True)
      continue
    with open(out) as f:
      result = json.load(f)
    os.remove(out)
    print(row(CASES[i], result), flush=True)
    if a.json_out:
      with open(a.json_out, "a") as f:
        f.write(json.dumps({"case": CASES[i], "plan": result}, default=str) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
