#!/usr/bin/env bash
# The GPU check in one command: every row of benchmarks/gpu_check.py on the first CUDA device, over within 8 minutes.
#
#   bash benchmarks/gpu_check.sh [more gpu_check.py options, e.g. --only updates]
#
# Prints the Markdown table and writes it to results/gpu/gpu_check.md (raw figures: gpu_check.json next to it;
# GPU_CHECK_OUT=DIR puts both elsewhere). The script starts no row after 400 s and rewrites the table after every
# row; `timeout` is the hard stop at 8 minutes, and the rows finished by then stay in the file.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${GPU_CHECK_OUT:-results/gpu}"
mkdir -p "$out"
status=0
timeout --kill-after=15 480 "${PYTHON:-python}" benchmarks/gpu_check.py --device cuda --budget-s 400 \
  --out "$out/gpu_check.md" --json "$out/gpu_check.json" "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "gpu_check.py ended with status $status (124: stopped by the 8-minute timeout); rows it finished:" >&2
  cat "$out/gpu_check.md" 2>/dev/null || echo "(no table was written)" >&2
fi
exit "$status"
