#!/usr/bin/env bash
# The accelerator check, as one script: SuperCLIP and CLIP B/16, bf16, 256 images per chip,
# each attention implementation, timed side by side by bench/bench_step.py (no TensorFlow).
#
#   bash bench/device_check.sh OUT_DIR            # writes OUT_DIR/<attention>.{md,json}, summary.md
#   bash bench/device_check.sh --dry-run OUT_DIR  # prints the commands only
#
# Budget: about 8 minutes on one H200 (three pairs of compiles of ~1 min each, 10 timed steps).
# Environment: BATCH_PER_DEVICE (256), STEPS (10), ATTENTIONS ("cudnn jax xla"), PYTHON.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
out="${1:?usage: bench/device_check.sh [--dry-run] OUT_DIR}"
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
batch="${BATCH_PER_DEVICE:-256}"
steps="${STEPS:-10}"
attentions="${ATTENTIONS:-cudnn jax xla}"
mkdir -p "$out"
for attention in $attentions; do
  cmd=("$python" bench/bench_step.py --config=configs/b16.py --batch_per_device="$batch"
       --steps="$steps" --warmup=2 --config.model.dtype=bfloat16
       --config.model.attention="$attention" --json_out="$out/$attention.json")
  if (( dry_run )); then
    printf '%q ' "${cmd[@]}"; printf '> %q\n' "$out/$attention.md"
    continue
  fi
  echo "== attention=$attention" >&2
  # One failing implementation (e.g. cudnn without a GPU) must not cost the others' numbers.
  if "${cmd[@]}" > "$out/$attention.md" 2> "$out/$attention.log"; then
    sed -n '/^| mode/,/^step time/p' "$out/$attention.md" >&2
  else
    echo "attention=$attention failed: tail of $out/$attention.log" >&2
    tail -5 "$out/$attention.log" >&2
  fi
done
if (( ! dry_run )); then
  for attention in $attentions; do
    [[ -s "$out/$attention.md" ]] && sed -n '/^| mode/,/^step time/p' "$out/$attention.md"
  done > "$out/summary.md" || true
fi
