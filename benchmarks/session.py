"""One GPU benchmark session (benchmarks/gpu.sh), under 8 minutes, from the working tree alone, offline.

Every piece is its own process under its own time limit (and all of them under one overall budget), so a
piece that fails, or runs out of time, leaves one {"bench": …, "error": …} line and the others' numbers:

  vs_official   one full-size CogVideoX-VAP forward with CFG (batch 2, 49 frames 480×720, 1 reference,
                bf16), the official PyTorch model and ours on the same weights (its state dict converted
                in memory): both times, ratio, relative error, both peaks. Needs the official diffusers
                fork under benchmarks/official/ (benchmarks/prepare_official.sh); without it the line
                says "skipped" and the session goes on with ours alone.
  sampling      T5, VAE encode, one denoising step, VAE decode, each timed at full size (offload=encoders);
                the 50-step estimate (benchmarks.sampling_time).
  train         one full-size training step that fits one H100: experts on 0–40, full remat, bf16 AdamW
                moments, XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (benchmarks.step_time): time, compile, peak, MFU.
  offload_*     one denoising step per offload mode (none, encoders, layers, int8): step time and the
                device's peak memory; offload_encoders runs with an empty persistent compilation cache,
                cache_warm repeats it on the filled cache (compile time vs the second run's start).
Blockwise attention at 35k tokens is not a piece (its compile and step exceed any limit that fits here).

Results: JSON lines on stdout, and (--notes) a markdown table appended to benchmarks/NOTES.md naming the
device; --out DIR also gets results.jsonl and table.md. `--tiny` is the CPU rehearsal of the same pieces
at tiny size (tests/test_benchmarks.py runs it in a clean copy of the tree).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(ROOT, "benchmarks", "official")
BUDGET_S = 460          # the whole session: 8 minutes less start-up and slack
MODES = ("encoders", "none", "layers", "int8")
TINY_SLOWER = 3         # --tiny: every limit and the budget × this (a loaded 2-core CPU compiles slowly)


def pieces(tiny: bool, official: str, cache: str):
    """(name, limit_s, argv, extra env) in priority order; argv None: skipped, with the reason in env."""
    py = sys.executable
    size = ["--tiny"] if tiny else []
    have_official = os.path.isfile(os.path.join(official, "diffusers", "src", "diffusers", "models", "transformers",
                                                "cogvideox_transformer_3d_mot.py"))
    out = []
    if have_official:
        out.append(("vs_official", 170, [py, "-m", "benchmarks.vs_official", "--repo", official, "--config",
                                         "tiny" if tiny else "full", "--repeats", "1" if tiny else "3"], {}))
    else:
        out.append(("vs_official", 0, None, {"skipped": f"no official source in {os.path.relpath(official, ROOT)} "
                                                        "(benchmarks/prepare_official.sh CHECKOUT): ours only"}))
    out.append(("sampling", 110, [py, "-m", "benchmarks.sampling_time", *size, "--repeats", "1" if tiny else "2"], {}))
    out.append(("train", 100, [py, "-m", "benchmarks.step_time", *size, "--what", "train", "--batch", "1",
                               "--remat", "full", "--moments", "bfloat16", "--repeats", "1" if tiny else "2"],
                {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".95"}))
    for mode in MODES:
        extra = ["--cache", cache] if mode == "encoders" else []
        out.append((f"offload_{mode}", 60, [py, "-m", "benchmarks.sampling_time", *size, "--stages", "denoise",
                                            "--offload", mode, "--repeats", "1" if tiny else "2", *extra], {}))
        if mode == "encoders":
            out.append(("cache_warm", 45, [py, "-m", "benchmarks.sampling_time", *size, "--stages", "denoise",
                                           "--offload", mode, "--repeats", "1", *extra], {}))
    return out


def run_piece(name, limit, argv, env, deadline):
    """The piece's JSON lines (each tagged with its name and wall time), or one line saying why none."""
    if argv is None:
        return [{"bench": name, **env}]
    limit = min(limit, deadline - time.monotonic() - 5)
    if limit < 10:
        return [{"bench": name, "error": "no time left in the session's budget"}]
    t0 = time.monotonic()
    try:
        run = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=limit)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-600:]
        return [{"bench": name, "error": f"timed out after {limit:.0f} s",
                 "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}]
    wall = time.monotonic() - t0
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        return [{"bench": name, "error": f"exit status {run.returncode}", "stderr_tail": run.stderr[-600:]}]
    return [{**line, "bench": name, "wall_s": wall} for line in lines]


def _gib(x):
    return f"{x:.1f} GiB" if isinstance(x, (int, float)) else "—"


def _s(x):
    return f"{x:.3g} s" if isinstance(x, (int, float)) else "—"


def table(results, device: str, tiny: bool) -> str:
    """The session as markdown rows (one per piece)."""
    day = datetime.date.today().isoformat()
    rows = [f"\n### GPU session {day}, {device}{' (tiny CPU rehearsal)' if tiny else ''}\n",
            "| piece | result |", "|---|---|"]
    for r in results:
        if "error" in r or "skipped" in r:
            what = f"**{r.get('error') or 'skipped'}**" + (f": {r['skipped']}" if "skipped" in r else "")
        elif r["bench"] == "vs_official":
            what = (f"official {_s(r['official_s'])}, ours {_s(r['ours_s'])} (× {r['ratio_ours_over_official']:.2f}), "
                    f"rel. err {r['rel_err']:.2e} ({'agree' if r['agree'] else 'DISAGREE'}), ours compile "
                    f"{_s(r['ours_compile_s'])}, peaks {_gib(r['official_peak_gib'])} / {_gib(r['ours_peak_gib'])}")
        elif r["bench"] == "sampling":
            st = {k.split(" (")[0]: v["median_s"] for k, v in r["stages"].items()}
            what = (f"T5 {_s(st['text encoder'])}, VAE encode {_s(st['VAE encode'])}, step {_s(r['step_s'])}, "
                    f"VAE decode {_s(st['VAE decode'])} → 50 steps ≈ {_s(r['estimate_50_steps_s'])}; "
                    f"peak {_gib(r['peak_gib'])}")
        elif r["bench"] == "train":
            what = (f"step {_s(r['median_s'])}, compile {_s(r['compile_s'])}, peak {_gib(r['peak_memory_gib'])}, "
                    f"MFU {r['mfu']:.1%}" if r.get("mfu") is not None else
                    f"step {_s(r['median_s'])}, compile {_s(r['compile_s'])}, peak {_gib(r['peak_memory_gib'])}")
            what += f" (experts on {r['expert_layers']} layers, remat {r['remat']}, {r['moments']} moments)"
        else:  # offload_* and cache_warm: one denoising step
            (first,) = [v["first_s"] for v in r["stages"].values()]
            what = f"step {_s(r['step_s'])}, first call {_s(first)}, peak {_gib(r['peak_gib'])}, process {_s(r['wall_s'])}"
        rows.append(f"| {r['bench']} | {what} |")
    return "\n".join(rows) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the CPU rehearsal: every piece at tiny size")
    ap.add_argument("--official", default=OFFICIAL, help="the official diffusers fork (benchmarks/official)")
    ap.add_argument("--notes", default=os.path.join(ROOT, "benchmarks", "NOTES.md"),
                    help="append the markdown table here ('' for none)")
    ap.add_argument("--out", default="", help="also write results.jsonl and table.md into this folder")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole session (default {BUDGET_S}; --tiny: {TINY_SLOWER}× that)")
    args = ap.parse_args()
    # The rehearsal runs on a (possibly loaded) CPU: the same limits, stretched.
    stretch = TINY_SLOWER if args.tiny else 1
    deadline = time.monotonic() + (args.budget or BUDGET_S * stretch)
    cache = tempfile.mkdtemp(prefix="vapjax-cache-")
    results = []
    try:
        for name, limit, argv, env in pieces(args.tiny, os.path.abspath(args.official), cache):
            for line in run_piece(name, limit * stretch, argv, env, deadline):
                print(json.dumps(line), flush=True)
                results.append(line)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    device = next((r["device"] for r in results if "device" in r), "unknown device")
    md = table(results, device, args.tiny)
    if args.notes:
        with open(args.notes, "a") as f:
            f.write(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
