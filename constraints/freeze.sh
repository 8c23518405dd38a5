#!/usr/bin/env bash
# Prints a constraints file: the exact versions that `pip install -e '.[EXTRAS]'` resolves to in a
# fresh venv of PYTHON from the registry as it is now (pip's --dry-run report: nothing is
# installed). With --lowest, each range in setup.py (a requirement with both a lower and an upper
# bound) is held at its lower bound, which gives the lower tested end; without it, the newest.
# Usage (see constraints/README.md):
#   constraints/freeze.sh PYTHON EXTRAS [--lowest] > constraints/pyXY.txt
set -euo pipefail
py=$1 extras=$2 lowest=${3:-}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m venv "$tmp/venv"
resolve() {  # $1: report path; further arguments go to pip
  local report=$1
  shift
  "$tmp/venv/bin/python" -m pip install -q --dry-run --ignore-installed --report "$report" \
    -e ".[$extras]" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
# Reads a pip report; 'lower' prints name==lower bound for setup.py's ranges, 'pins' prints the
# resolved name==version of everything but our package and pip's own tools (as pip freeze does).
report() {
  "$tmp/venv/bin/python" - "$@" <<'PY'
import json, re, sys
mode, path = sys.argv[1:]
items = json.load(open(path))["install"]
if mode == "lower":
  ours = next(i for i in items if i["metadata"]["name"] == "superclip_jax")
  pins = {}
  for req in ours["metadata"].get("requires_dist", []):
    name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
    spec = req.split(";")[0]
    low = re.search(r">=\s*([^,;\s]+)", spec)
    if low and "<" in spec.replace("<=", ""):
      pins[name.lower()] = low.group(1)
  print("\n".join(f"{n}=={v}" for n, v in sorted(pins.items())))
else:
  skip = {"superclip-jax", "superclip_jax", "pip", "setuptools", "wheel"}
  pins = sorted(((i["metadata"]["name"], i["metadata"]["version"]) for i in items),
                key=lambda p: p[0].lower())
  print("\n".join(f"{n}=={v}" for n, v in pins if n.lower() not in skip))
PY
}
: > "$tmp/lower.txt"
if [[ $lowest == --lowest ]]; then
  resolve "$tmp/first.json"
  report lower "$tmp/first.json" > "$tmp/lower.txt"
fi
resolve "$tmp/final.json" -c "$tmp/lower.txt"
echo "# $("$tmp/venv/bin/python" -V), extras [$extras]${lowest:+, $lowest}:" \
  "written by constraints/freeze.sh"
report pins "$tmp/final.json"
