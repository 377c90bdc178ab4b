#!/usr/bin/env bash
# One GPU benchmark session, < 8 minutes on one H100/H200, JSON lines on stdout:
#   1. one full-size sampling step with CFG (batch 2, 49 frames 480×720, 1 reference, bf16): the official
#      PyTorch model and ours with cuDNN attention, side by side in one process (benchmarks.vs_official:
#      times, ratio, our compile time, both peak memories);
#   2. one training step, batch 1, full remat: time, compile time, peak memory, MFU (benchmarks.step_time);
#   3. the sampling step of 1. with our blockwise attention instead of cuDNN (benchmarks.step_time).
# Every piece runs under its own time limit (180 + 140 + 140 s, plus 5 s each to die), so the whole
# script ends within 7 min 55 s; a piece that fails or runs out of time prints one {"error": ...} line.
#
#   benchmarks/gpu.sh PATH/TO/Video-As-Prompt           # on the GPU machine, torch with CUDA installed
#   benchmarks/gpu.sh PATH/TO/Video-As-Prompt --tiny    # the same pieces at tiny size (CPU dry run)
set -u
REPO=${1:?usage: benchmarks/gpu.sh VIDEO_AS_PROMPT_CHECKOUT [--tiny]}
TINY=${2:-}
cd "$(dirname "$0")/.."
LOGS=$(mktemp -d)

piece() {  # NAME LIMIT_S COMMAND...: the command's JSON lines, or one JSON line saying why there are none
  local name=$1 limit=$2 rc
  shift 2
  timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err"
  rc=$?
  grep '^{' "$LOGS/$name.out"
  if [ $rc -ne 0 ]; then
    python - "$name" "$rc" "$limit" "$LOGS/$name.err" <<'PY'
import json, sys
name, rc, limit, err = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
why = f"timed out after {limit} s" if rc in (124, 137) else f"exit status {rc}"
print(json.dumps({"bench": name, "error": why, "stderr_tail": open(err, errors="replace").read()[-600:]}))
PY
  fi
}

if [ "$TINY" = "--tiny" ]; then
  piece vs_official 180 python -m benchmarks.vs_official --repo "$REPO" --config tiny --attention xla --repeats 2
  piece train 140 python -m benchmarks.step_time --tiny --what train --batch 1 --remat full --repeats 2
  piece forward_blockwise 140 python -m benchmarks.step_time --tiny --what forward --batch 2 --attention blockwise --repeats 1
else
  # Full size: --no-check gives ours its own random weights (saving and converting 22 GB would not fit the
  # time); agreement of the two implementations is what --config mid (CPU) and tests/test_golden.py check.
  piece vs_official 180 python -m benchmarks.vs_official --repo "$REPO" --config full --no-check --attention cudnn --repeats 3
  piece train 140 python -m benchmarks.step_time --what train --batch 1 --remat full --repeats 2
  piece forward_blockwise 140 python -m benchmarks.step_time --what forward --batch 2 --attention blockwise --repeats 1
fi
rm -rf "$LOGS"
