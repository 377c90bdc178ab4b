"""VAP-Toy metrics with ground truth: semantic alignment, reference sensitivity, fidelity.

    python evaluate.py --pipeline vapjax/assets/toy/pipeline --out eval/toy --pairs 200 --seeds 0,1,2

For every pair of a split (one condition on two scenes), the model animates the target's first frame
with the target caption *stripped of its effect words*, and by default (`--ref-caption stripped`) the
reference caption too, so only the reference video can carry the semantics. The oracle
(`vapjax.toy.oracle`) reads the condition of each output:
  alignment    VAP's output reads as the reference's condition
  backbone     the frozen backbone alone (no reference), same image and stripped caption: near chance
               (1 / #conditions) if the caption carries no semantics
  sensitivity  the same image and caption with another pair's reference (another condition): the
               output reads as the *new* reference's condition ("reference ignored", measured)
  psnr / ssim  VAP's output against the ground-truth target clip; first_frame_psnr: frame 0 against the
               given image (identity)
Results: results.json (per split, seed and family), results.md (mean ± std over seeds), results.png.
A metric is a function of (outputs, pairs), so metrics of real models can join `METRICS` later.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
    out = []
    for s in range(0, len(images), batch):
        sl = slice(s, s + batch)
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
    return np.concatenate(out)


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
# Evaluation
# ---------------------------------------------------------------------------------------------

REF_CAPTIONS = ("full", "stripped")


def evaluate_split(pipe: CogVideoXVAP, oracle: Oracle, split: str, n: int, seed: int, *, steps: int = 20,
                   sensitivity: bool = True, backbone_alone: bool = True, ref_caption: str = "stripped",
                   log=print) -> dict:
    """Metrics of one split and seed: overall and per family, plus the per-pair readings.
    `ref_caption`: "full" gives the reference its caption naming the effect (as VAP-Data's do); "stripped"
    removes those words too, so that only the reference *video* can carry the semantics."""
    if ref_caption not in REF_CAPTIONS:
        raise ValueError(f"unknown ref_caption {ref_caption!r}; known: {', '.join(REF_CAPTIONS)}")
    t0 = time.time()
    ps = world.pairs(split, n, seed)
    conds = [p.condition for p in ps]
    targets = np.stack([p.target_clip() for p in ps])
    refs = np.stack([p.reference_clip() for p in ps])
    ref_caps, tgt_caps = zip(*(p.captions(strip_effect=True, strip_reference=ref_caption == "stripped") for p in ps))
    images = targets[:, 0]
    vap = generate(pipe, images, tgt_caps, refs, ref_caps, steps=steps, seed=seed)
    read = {"vap": oracle.read(vap), "reference": oracle.read(refs)}
    if backbone_alone:  # the same image and stripped caption with no reference
        read["backbone"] = oracle.read(generate(pipe, images, tgt_caps, steps=steps, seed=seed))
    per_pair = {"condition": conds, **{f"read_{k}": v for k, v in read.items()}}
    hits = {"alignment": np.array(read["vap"]) == conds, "oracle_on_reference": np.array(read["reference"]) == conds}
    if backbone_alone:
        hits["backbone"] = np.array(read["backbone"]) == conds
    if sensitivity:  # the next pair's reference (another condition), with its caption
        swap = [(k + 1) % n for k in range(n)]
        swapped = generate(pipe, images, tgt_caps, refs[swap], [ref_caps[j] for j in swap], steps=steps, seed=seed)
        read["swapped"] = oracle.read(swapped)
        per_pair["swapped_condition"] = [conds[j] for j in swap]
        per_pair["read_swapped"] = read["swapped"]
        hits["sensitivity"] = np.array(read["swapped"]) == np.array(per_pair["swapped_condition"])
    values = {**{k: v.astype(np.float64) for k, v in hits.items()}, "psnr": psnr(vap, targets), "ssim": ssim(vap, targets),
              "first_frame_psnr": psnr(vap[:, 0], images)}
    families = np.array([world.CONDITIONS[c].family for c in conds])
    result = {"overall": {k: float(v.mean()) for k, v in values.items()}, "families": {}}
    for fam in world.FAMILIES:
        m = families == fam
        if m.any():
            result["families"][fam] = {k: float(v[m].mean()) for k, v in values.items()}
    result["chance"] = 1 / len(world.SPLITS[split][1])
    result["pairs"] = per_pair
    log(f"{split} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["overall"].items())
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


COLUMNS = ("alignment", "backbone", "sensitivity", "psnr", "ssim", "first_frame_psnr", "oracle_on_reference")


def markdown(summary: dict, results: dict) -> str:
    lines = []
    for split, groups in summary.items():
        seeds = ", ".join(results[split])
        chance = next(iter(results[split].values()))["chance"]
        lines += [f"### {split} (seeds {seeds}; chance {chance:.3f})", "",
                  "| group | " + " | ".join(c for c in COLUMNS if c in groups["overall"]) + " |",
                  "|---|" + "---|" * sum(c in groups["overall"] for c in COLUMNS)]
        for g, m in groups.items():
            cells = [f"{m[c][0]:.3f} ± {m[c][1]:.3f}" if c not in ("psnr", "first_frame_psnr")
                     else f"{m[c][0]:.2f} ± {m[c][1]:.2f}" for c in COLUMNS if c in m]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415 (plots only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    splits = list(summary)
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        groups = list(summary[split])
        metrics = [m for m in ("alignment", "sensitivity", "backbone") if m in summary[split]["overall"]]
        width = 0.8 / len(metrics)
        for i, m in enumerate(metrics):
            mean = [summary[split][g][m][0] for g in groups]
            std = [summary[split][g][m][1] for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, mean, width, yerr=std, label=m, capsize=2)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
        ax.set_ylim(0, 1.05)
        ax.set_title(split)
        ax.legend(fontsize=8)
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
