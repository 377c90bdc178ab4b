"""VAP-Toy metrics with ground truth: semantic alignment, paired reference sensitivity, fidelity, and the
ceilings and floors that bound them.

    python evaluate.py --pipeline vapjax/assets/toy/pipeline --out eval/toy --pairs 200 --seeds 0,1,2

For every pair of a split (one condition A on two scenes), the model animates the target's first frame
with the target caption *stripped of its effect words*, and by default (`--ref-caption stripped`) the
reference caption too, so only the reference video can carry the semantics. The oracle
(`vapjax.toy.oracle`) reads the condition of each clip; every row is the share of pairs read right,
grouped by the family of the pair's condition A:
  alignment           VAP's output reads as A
  paired_sensitivity  VAP's output reads as A *and*, with the reference scene showing a condition B of
                      another family instead (drawn per pair; same image, caption and noise), reads as B:
                      an output that ignores its reference cannot pass both
  ground_truth        the oracle on the ground-truth target (ceiling)
  vae_roundtrip       the oracle on the ground truth's VAE round trip: the measuring ceiling, what a
                      perfect model's latents would read as
  backbone_full       the frozen backbone alone with the full target caption (naming the effect): the
                      rendering ceiling, what the backbone can draw at all
  backbone            the backbone alone with the stripped caption (floor: near chance, 1 / #conditions)
  still               a still video, the target image repeated (floor: what reading nothing scores)
  psnr / ssim         each clip against the ground-truth target; first_frame_psnr: frame 0 against the
                      given image (identity)
Results: results.json (per split, seed and family, the per-pair readings and confusion counts),
results.md (mean ± std over seeds), results.png, and confusion_<split>.png (per method: what the oracle
read against the truth, per condition, summed over seeds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import zlib
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vapjax import conditioning, sampling
from vapjax.models import cogvideox
from vapjax.pipelines.cogvideox_vap import CogVideoXVAP
from vapjax.toy import world
from vapjax.toy.oracle import Oracle


# ---------------------------------------------------------------------------------------------
# Batched generation (the pipeline's stages, many examples at once, no CFG)
# ---------------------------------------------------------------------------------------------

@partial(jax.jit, static_argnums=0)
def _sample(cfg, params, x, image_in, text, ref_in, ref_text, steps):
    model = cogvideox.CogVideoXTransformer(cfg)

    def denoise(x, t, i):
        xin = jnp.concatenate([x, image_in], axis=-1)
        return model.apply({"params": params}, xin, text, jnp.full((x.shape[0],), t), ref_in, ref_text)

    return sampling.sample_loop(denoise, x, steps, dtype=jnp.dtype(cfg.dtype))


def generate(pipe: CogVideoXVAP, images: np.ndarray, prompts: Sequence[str], ref_clips: np.ndarray | None = None,
             ref_prompts: Sequence[str] | None = None, *, steps: int = 20, seed: int = 0,
             batch: int = 32) -> np.ndarray:
    """uint8 clips [B, F, H, W, 3] animating `images` [B, H, W, 3] at the toy size, each with one reference
    clip (or none: the backbone alone). Posterior modes for the conditions; noise from `seed`."""
    enc, vae, cfg = pipe.encoders, pipe.encoders.vae_config, pipe.transformer.config
    sf, length = vae.scaling_factor, cfg.max_text_seq_length
    schedule = pipe.schedule.steps(steps)
    # Equal chunks of at most `batch` (the last padded by repeating its final row): one program shape, so the
    # sampling loop and the VAE compile once per call, not once more for a short remainder.
    n = len(images)
    chunks = math.ceil(n / batch)
    size = math.ceil(n / chunks)
    pad = lambda a: None if a is None else np.concatenate([np.asarray(a)] + [np.asarray(a)[-1:]] * (chunks * size - n))
    images, prompts, ref_clips, ref_prompts = (pad(a) for a in (images, prompts, ref_clips, ref_prompts))
    out = []
    for s in range(0, n, size):
        sl = slice(s, s + size)
        image = enc.posterior(images[sl][:, None]).mode() * sf
        text = enc.encode_text(list(prompts[sl]), length)
        f = (world.FRAMES - 1) // vae.temporal_compression_ratio + 1
        ref_in = ref_text = None
        if ref_clips is not None:
            ref = enc.posterior(ref_clips[sl]).mode() * sf
            first = enc.posterior(ref_clips[sl][:, :1]).mode() * sf
            cond = conditioning.cogvideox(image, ref[:, None], first[:, None], text,
                                          enc.encode_text(list(ref_prompts[sl]), length)[:, None])
            ref_in, ref_text = cond["ref_latents"], cond["ref_text"]
        x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), s),
                              (image.shape[0], f) + image.shape[2:4] + (cfg.out_channels,))
        z = _sample(cfg, pipe.transformer.params, x, conditioning.pad_frames(image, f), text, ref_in, ref_text, schedule)
        pixels = enc.decode(z * np.float32(1 / sf))
        out.append(np.asarray(jnp.round(jnp.clip(pixels * 127.5 + 127.5, 0, 255))).astype(np.uint8))
    return np.concatenate(out)[:n]


# ---------------------------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-clip PSNR (dB) of uint8 arrays [B, ...]."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=tuple(range(1, a.ndim)))
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-clip mean SSIM of luminance (7×7 uniform windows, the usual constants) of uint8 [B, F, H, W, 3]."""
    lum = lambda x: x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # noqa: E731

    def box(x, k=7):  # mean over k×k windows (valid), via cumulative sums
        c = np.cumsum(np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]), -1), -2)
        return (c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]) / k ** 2

    x, y = lum(a), lum(b)
    mx, my = box(x), box(y)
    vx, vy, cxy = box(x * x) - mx ** 2, box(y * y) - my ** 2, box(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(axis=tuple(range(1, s.ndim)))


# ---------------------------------------------------------------------------------------------
# Metrics on the oracle's readings (no model: the tests pin them on hand-built readings)
# ---------------------------------------------------------------------------------------------

def swap_conditions(conditions: Sequence[str], candidates: Sequence[str], seed: int) -> list[str]:
    """For each pair's condition A, a condition B drawn (by `seed`) from the `candidates` of ANOTHER family:
    the swapped reference then carries other semantics, so one output cannot read as both."""
    rng = np.random.default_rng(zlib.crc32(f"swap/{seed}".encode()))
    out = []
    for a in conditions:
        others = [c for c in candidates if world.CONDITIONS[c].family != world.CONDITIONS[a].family]
        if not others:
            raise ValueError(f"no condition of another family than {a!r} among {list(candidates)}")
        out.append(str(others[rng.integers(len(others))]))
    return out


def paired_sensitivity(conditions: Sequence[str], read: Sequence[str], swapped: Sequence[str],
                       read_swapped: Sequence[str]) -> np.ndarray:
    """Per pair: the output with reference A reads as A *and* the output with the swapped reference B (same
    image, caption and noise) reads as B. An output that ignores its reference fails one of the two."""
    return (np.asarray(read) == np.asarray(conditions)) & (np.asarray(read_swapped) == np.asarray(swapped))


def group_by_family(values: dict[str, np.ndarray], conditions: Sequence[str]) -> dict:
    """{"overall": {metric: mean}, "families": {family: {metric: mean}}}, each pair counted under the family
    of its own condition (A; the swapped reference's family never enters)."""
    families = np.array([world.CONDITIONS[c].family for c in conditions])
    mean = lambda m: {k: float(np.mean(np.asarray(v, np.float64)[m])) for k, v in values.items()}  # noqa: E731
    return {"overall": mean(np.ones(len(families), bool)),
            "families": {f: mean(families == f) for f in world.FAMILIES if (families == f).any()}}


def confusion(truth: Sequence[str], read: Sequence[str],
              labels: Sequence[str] = tuple(world.CONDITIONS)) -> np.ndarray:
    """Counts [truth, read] over `labels`: row i, column j = the clips of condition i the oracle read as j."""
    index = {name: i for i, name in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(counts, ([index[t] for t in truth], [index[r] for r in read]), 1)
    return counts


# What each accuracy row reads (the oracle names the pair's condition A, unless said otherwise): VAP, then
# the ceilings (what the instrument and the backbone can reach) and the floors (what reading nothing gets).
ROWS = {
    "alignment": "VAP: reads as the reference's condition A",
    "paired_sensitivity": "VAP: reads A with reference A, and B with a reference B of another family",
    "ground_truth": "ceiling: the oracle on the ground-truth target",
    "vae_roundtrip": "measuring ceiling: the oracle on the ground truth's VAE round trip",
    "backbone_full": "rendering ceiling: the backbone alone, full target caption",
    "backbone": "floor: the backbone alone, stripped caption",
    "still": "floor: a still video (frame 0 repeated)",
}
# The clips whose fidelity against the ground-truth target is reported ("vap" under the plain names).
FIDELITY = ("vap", "vae_roundtrip", "backbone_full", "backbone", "still")
# The clips a confusion matrix is drawn for; the truth is each pair's A (for "swapped": its B).
METHODS = ("vap", "swapped", "ground_truth", "vae_roundtrip", "backbone_full", "backbone", "still")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

REF_CAPTIONS = ("full", "stripped")


def roundtrip(pipe: CogVideoXVAP, clips: np.ndarray, batch: int = 16) -> np.ndarray:
    """uint8 clips through the pipeline's VAE (posterior mode, decoded): what a perfect model's latents give."""
    enc = pipe.encoders
    out = [np.asarray(jnp.round(jnp.clip(enc.decode(enc.posterior(clips[s:s + batch]).mode()) * 127.5 + 127.5, 0, 255)))
           for s in range(0, len(clips), batch)]
    return np.concatenate(out).astype(np.uint8)


def evaluate_split(pipe: CogVideoXVAP, oracle: Oracle, split: str, n: int, seed: int, *, steps: int = 20,
                   sensitivity: bool = True, ceilings: bool = True, backbone_alone: bool = True,
                   ref_caption: str = "stripped", log=print) -> dict:
    """Metrics of one split and seed: overall and per family (of each pair's condition), the per-pair
    readings and a confusion matrix per method. `ceilings=False` skips the VAE round trip and the
    full-caption backbone, `backbone_alone=False` the stripped-caption one (the ground truth and the still
    video are free). `ref_caption`: "full" gives the reference
    its caption naming the effect (as VAP-Data's do); "stripped" removes those words too, so that only the
    reference *video* can carry the semantics."""
    if ref_caption not in REF_CAPTIONS:
        raise ValueError(f"unknown ref_caption {ref_caption!r}; known: {', '.join(REF_CAPTIONS)}")
    t0 = time.time()
    ps = world.pairs(split, n, seed)
    conds = [p.condition for p in ps]
    targets = np.stack([p.target_clip() for p in ps])
    strip_ref = ref_caption == "stripped"
    ref_caps, tgt_caps = zip(*(p.captions(strip_effect=True, strip_reference=strip_ref) for p in ps))
    images = targets[:, 0]
    gen = partial(generate, pipe, images, steps=steps, seed=seed)
    clips = {"vap": gen(tgt_caps, np.stack([p.reference_clip() for p in ps]), ref_caps),
             "ground_truth": targets, "still": np.repeat(targets[:, :1], targets.shape[1], axis=1)}
    if ceilings:
        clips["vae_roundtrip"] = roundtrip(pipe, targets)
        clips["backbone_full"] = gen([p.captions()[1] for p in ps])
    if backbone_alone:
        clips["backbone"] = gen(tgt_caps)
    truth = {m: conds for m in clips}
    if sensitivity:  # the same reference scene showing B, its caption built as A's was
        swapped = [dataclasses.replace(p, condition=b)
                   for p, b in zip(ps, swap_conditions(conds, world.SPLITS[split][1], seed))]
        clips["swapped"] = gen(tgt_caps, np.stack([q.reference_clip() for q in swapped]),
                               [q.captions(strip_reference=strip_ref)[0] for q in swapped])
        truth["swapped"] = [q.condition for q in swapped]
    read = {m: oracle.read(c) for m, c in clips.items()}
    values = {r: np.asarray(read[r]) == np.asarray(truth[r]) for r in ROWS if r in read}
    values["alignment"] = np.asarray(read["vap"]) == np.asarray(conds)
    if sensitivity:
        values["paired_sensitivity"] = paired_sensitivity(conds, read["vap"], truth["swapped"], read["swapped"])
    for m in FIDELITY:
        if m in clips:
            suffix = "" if m == "vap" else f"/{m}"
            values[f"psnr{suffix}"], values[f"ssim{suffix}"] = psnr(clips[m], targets), ssim(clips[m], targets)
            values[f"first_frame_psnr{suffix}"] = psnr(clips[m][:, 0], images)
    result = group_by_family(values, conds)
    result["chance"] = 1 / len(world.SPLITS[split][1])
    result["pairs"] = {"condition": conds, **({"swapped_condition": truth["swapped"]} if sensitivity else {}),
                       **{f"read_{m}": r for m, r in read.items()}}
    result["confusion"] = {m: confusion(truth[m], read[m]).tolist() for m in METHODS if m in read}
    log(f"{split} seed {seed}: " + ", ".join(f"{k} {result['overall'][k]:.3f}" for k in ROWS if k in values)
        + f" ({time.time() - t0:.0f}s)")
    return result


def summarise(results: dict) -> dict:
    """{split: {group: {metric: (mean, std)}}} over seeds."""
    out = {}
    for split, by_seed in results.items():
        runs = list(by_seed.values())
        groups = {"overall": [r["overall"] for r in runs]}
        for fam in world.FAMILIES:
            if all(fam in r["families"] for r in runs):
                groups[fam] = [r["families"][fam] for r in runs]
        out[split] = {g: {k: (float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms])))
                          for k in ms[0]} for g, ms in groups.items()}
    return out


def markdown(summary: dict, results: dict) -> str:
    """Per split: the oracle's accuracy per row (VAP, its ceilings and floors) and family, then fidelity."""
    lines = []
    for split, groups in summary.items():
        seeds = ", ".join(results[split])
        first = next(iter(results[split].values()))
        fams = [g for g in groups if g != "overall"]
        if split == "unseen_conditions":  # one condition per family: name it
            names = {world.CONDITIONS[c].family: c for c in world.SPLITS[split][1]}
            heads = [f"{f} ({names[f]})" for f in fams]
        else:
            heads = fams
        lines += [f"### {split} (seeds {seeds}; {len(first['pairs']['condition'])} pairs; chance {first['chance']:.3f})",
                  "", "Accuracy: the share of pairs whose clip the oracle reads as the truth (mean ± std over seeds; "
                  "families are those of each pair's condition A).", "",
                  "| row | all | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(fams)]
        cell = lambda m: f"{m[0]:.3f} ± {m[1]:.3f}"  # noqa: E731
        for r, text in ROWS.items():
            if r in groups["overall"]:
                lines.append(f"| {text} | " + " | ".join(cell(groups[g][r]) for g in ["overall", *fams]) + " |")
        lines += ["", "Fidelity against the ground-truth target (all pairs):", "",
                  "| clip | PSNR | SSIM | first-frame PSNR |", "|---|---|---|---|"]
        for m in FIDELITY:
            suffix = "" if m == "vap" else f"/{m}"
            if f"psnr{suffix}" in groups["overall"]:
                o = groups["overall"]
                db = lambda v: "exact" if v[0] > 100 else f"{v[0]:.2f} ± {v[1]:.2f}"  # noqa: E731 (PSNR of equal clips)
                lines.append(f"| {m} | {db(o['psnr' + suffix])} | {cell(o['ssim' + suffix])} | "
                             f"{db(o['first_frame_psnr' + suffix])} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415 (plots only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    splits = list(summary)
    fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits), 3.8), squeeze=False)
    for ax, split in zip(axes[0], splits):
        groups = list(summary[split])
        rows = [r for r in ROWS if r in summary[split]["overall"]]
        width = 0.8 / len(rows)
        for i, r in enumerate(rows):
            mean = [summary[split][g][r][0] for g in groups]
            std = [summary[split][g][r][1] for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, mean, width, yerr=std, label=r, capsize=2)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
        ax.set_ylim(0, 1.05)
        ax.set_title(split)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(counts: dict, rows: Sequence[str], path: str, title: str) -> None:
    """One panel per method: the clips of each condition (rows: the truth) and what the oracle read
    (columns: every label), counts summed over seeds."""
    import matplotlib  # noqa: PLC0415 (plots only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    labels = list(world.CONDITIONS)
    keep = [labels.index(r) for r in rows]
    ncols = min(4, len(counts))
    nrows = -(-len(counts) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, (0.2 * len(rows) + 2.4) * nrows), squeeze=False)
    for ax in axes.flat[len(counts):]:
        ax.axis("off")
    for ax, (method, c) in zip(axes.flat, counts.items()):
        c = np.asarray(c)[keep]
        ax.imshow(c, cmap="Blues", aspect="auto", vmin=0)
        for i, j in zip(*np.nonzero(c)):
            ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=5)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
        ax.set_xlabel("oracle read", fontsize=7)
        ax.set_title(method, fontsize=8)
        ax.set_ylabel("truth", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(pipeline: str, oracle_path: str, out: str, *, splits: Sequence[str], pairs: int, seeds: Sequence[int],
        steps: int = 20, unseen_pairs: int | None = None, ref_caption: str = "stripped", log=print) -> dict:
    pipe = CogVideoXVAP.load(pipeline)
    oracle = Oracle.load(oracle_path)
    results = {}
    for split in splits:
        n = unseen_pairs if (split == "unseen_conditions" and unseen_pairs) else pairs
        results[split] = {str(s): evaluate_split(pipe, oracle, split, n, s, steps=steps, ref_caption=ref_caption,
                                                      log=log) for s in seeds}
    summary = summarise(results)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"summary": summary, "runs": results, "pairs_per_split": pairs, "steps": steps,
                   "ref_caption": ref_caption}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(summary, results))
    plot(summary, os.path.join(out, "results.png"))
    for split, by_seed in results.items():
        counts = {m: np.sum([r["confusion"][m] for r in by_seed.values()], axis=0)
                  for m in METHODS if m in next(iter(by_seed.values()))["confusion"]}
        plot_confusion(counts, world.SPLITS[split][1], os.path.join(out, f"confusion_{split}.png"),
                       f"{split}: what the oracle read (columns) against the truth (rows), seeds {', '.join(by_seed)}")
    return summary


def _one_line_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    from importlib.resources import files  # noqa: PLC0415
    toy = files("vapjax") / "assets" / "toy"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default=str(toy / "pipeline"), help="converted toy pipeline folder")
    ap.add_argument("--oracle", default=str(toy / "oracle.npz"))
    ap.add_argument("--out", default="eval/toy")
    ap.add_argument("--splits", default="heldout_scenes,unseen_conditions")
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--unseen-pairs", type=int, default=None, help="pairs for unseen_conditions (default --pairs)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--ref-caption", default="stripped", choices=REF_CAPTIONS,
                    help="the reference's caption: stripped (the video alone carries the semantics; the shipped "
                         "default's training) or full (it names its effect)")
    ap.error = _one_line_error  # argparse's own mistakes (e.g. --pairs x) too: one line, no usage dump
    a = ap.parse_args(argv)
    try:
        splits = [s for s in a.splits.split(",") if s]
        bad = [s for s in splits if s not in world.SPLITS]
        if bad:
            raise ValueError(f"unknown split(s) {bad}; splits: {', '.join(world.SPLITS)}")
        for flag, value in (("--pairs", a.pairs), ("--unseen-pairs", a.unseen_pairs), ("--steps", a.steps)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value}: must be at least 1")
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds {a.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        if not seeds:
            raise ValueError(f"--seeds {a.seeds!r}: expected at least one seed, e.g. 0,1,2")
        run(a.pipeline, a.oracle, a.out, splits=splits, pairs=a.pairs, seeds=seeds,
            steps=a.steps, unseen_pairs=a.unseen_pairs, ref_caption=a.ref_caption)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(open(os.path.join(a.out, "results.md")).read())


if __name__ == "__main__":
    main()
