#!/usr/bin/env bash
# Copy the official Video-As-Prompt diffusers fork's Python sources (diffusers/src, ~17 MB) from a local
# checkout into benchmarks/official/ (ignored by git), where benchmarks/gpu.sh finds them: the GPU machine
# is offline and sees only this tree. Nothing of it is committed.
#
#   git clone https://github.com/bytedance/Video-As-Prompt /tmp/Video-As-Prompt   # commit 0f30aed
#   benchmarks/prepare_official.sh /tmp/Video-As-Prompt
set -eu
SRC=${1:?usage: benchmarks/prepare_official.sh VIDEO_AS_PROMPT_CHECKOUT}
DST="$(cd "$(dirname "$0")" && pwd)/official"
MOT=diffusers/src/diffusers/models/transformers/cogvideox_transformer_3d_mot.py
[ -f "$SRC/$MOT" ] || { echo "error: $SRC: no $MOT (a Video-As-Prompt checkout?)" >&2; exit 2; }
rm -rf "$DST"
mkdir -p "$DST"
(cd "$SRC" && find diffusers/src -name '*.py' -print0 | tar --null -T - -cf -) | tar -xf - -C "$DST"
echo "$DST: $(find "$DST" -name '*.py' | wc -l) files, $(du -sh "$DST" | cut -f1)"
