#!/usr/bin/env bash
# One GPU benchmark session, < 8 minutes on one H100/H200, offline, from this working tree alone
# (benchmarks/session.py lists the pieces, each under its own time limit; JSON lines on stdout, a
# markdown table appended to benchmarks/NOTES.md, and with --out DIR results.jsonl + table.md there).
#
#   benchmarks/prepare_official.sh PATH/TO/Video-As-Prompt   # once, on a machine with the checkout
#   benchmarks/gpu.sh [--out DIR]                             # on the GPU machine (python3, jax[cuda], torch)
#   benchmarks/gpu.sh --tiny --notes ''                       # the CPU rehearsal (tests/test_benchmarks.py)
#
# The official model comes from benchmarks/official/ (ignored by git; it travels with the tree); without
# it the session reports ours alone. Needs only what the GPU image has (python3 with jax, flax, optax,
# orbax, torch, transformers, safetensors, sentencepiece); nothing outside the tree is read.
set -u
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # every piece is its own process; each takes what it needs
exec "${PYTHON:-python3}" -m benchmarks.session "$@"
