"""Where a trained VAP-Toy model loses the semantics, measured in latent space on training-pool clips:
does the expert read the reference video, and does the backbone render the effect at all?

    python -m vapjax.toy.diagnose --workdir runs/toy                 # a build workdir (vapjax.toy.build)
    python -m vapjax.toy.diagnose --workdir runs/diag --from-default # the shipped default

reference gain  the training objective (v-prediction loss) per noise band, for VAP with the target caption
                stripped and the reference caption stripped too, given: the right reference (the same
                condition on another scene), a wrong one (another condition), or none (the frozen backbone
                alone); and for the backbone with the full caption. right < none < wrong: the expert reads
                the reference video; full < none: the backbone reads the caption.
rendering       the backbone's DDIM samples with the full caption against the clips' own latents: mean
                squared error per family and latent frame, beside a still video (frame 0 repeated). An error
                near the still video's means the backbone does not render that family's change, and no
                expert on top of it can.
Writes diagnose.json and diagnose.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vapjax import checkpoint, conditioning, sampling, training
from vapjax.models import cogvideox
from vapjax.toy import build, world

BANDS = ((0, 300), (300, 700), (700, 1000))   # training timesteps: low, middle, high noise
REFERENCES = ("right", "none", "wrong", "backbone_full_caption")


def _load(work: str, transformer: str):
    data = dict(np.load(os.path.join(work, "encoded.npz")))
    vcfg, _ = checkpoint.load(os.path.join(work, "vae"), "cogvideox_vae")
    t5cfg, t5p = checkpoint.load(os.path.join(work, "backbone", "text_encoder"), "t5_encoder")
    cfg, params = checkpoint.load(transformer, "cogvideox_transformer")
    if "expert" not in params:
        raise ValueError(f"{transformer}: a transformer without an expert (the VAP model, not the backbone)")
    text = {k: build.text_embeddings(t5cfg, t5p, data[k]) for k in ("ids", "ids_stripped", "empty_ids")}
    return data, vcfg, cfg, params, text


def reference_gain(data, vcfg, cfg, params, text, *, pairs: int, seed: int = 0) -> dict:
    """{band: {reference: mean v-loss}} on `pairs` training-pool targets, the same noise for every row."""
    model = cogvideox.CogVideoXTransformer(cfg)
    alphas = sampling.DDIMSchedule.from_config(build.SCHEDULER).alphas_cumprod
    conds = data["conditions"]
    if np.bincount(conds).min() < 2:
        raise ValueError("the pool needs at least 2 clips per condition (a pair is one condition on two scenes)")
    rng = np.random.default_rng(seed)
    tgt = rng.integers(0, len(conds), pairs)
    right = build.same_condition_references(conds, tgt, rng)
    wrong = np.array([rng.choice(np.flatnonzero(conds != conds[j])) for j in tgt])
    empty = jnp.asarray(text["empty_ids"][0])

    @jax.jit
    def losses(batch, t, key):
        x = training.cogvideox_inputs(batch, key, vcfg.scaling_factor, empty, 0.0, jnp.float32)
        noise = jax.random.normal(jax.random.fold_in(key, 1), x["x0"].shape)
        vap = training.cogvideox_sample_losses(training.cogvideox_predictor(model, params, x), x["x0"], noise, t,
                                               alphas)
        alone = lambda x_t, tt: model.apply({"params": params}, jnp.concatenate([x_t, x["image"]], -1),  # noqa: E731
                                            x["text"], tt)
        return vap.mean(), training.cogvideox_sample_losses(alone, x["x0"], noise, t, alphas).mean()

    def batch(ref, caption):
        return jax.tree.map(jnp.asarray, dict(
            latent_dist=data["latent_dist"][tgt], image_dist=data["image_dist"][tgt],
            ref_latent_dist=data["latent_dist"][ref][:, None], ref_image_dist=data["image_dist"][ref][:, None],
            text=text[caption][tgt], ref_text=text["ids_stripped"][ref][:, None]))

    key, out = jax.random.PRNGKey(seed), {}
    for lo, hi in BANDS:
        t = jnp.asarray(np.random.default_rng([seed, lo]).integers(lo, hi, pairs))
        right_loss, none_loss = losses(batch(right, "ids_stripped"), t, key)
        wrong_loss, _ = losses(batch(wrong, "ids_stripped"), t, key)
        _, full_loss = losses(batch(right, "ids"), t, key)
        out[f"{lo}-{hi}"] = {"right": float(right_loss), "none": float(none_loss), "wrong": float(wrong_loss),
                             "backbone_full_caption": float(full_loss)}
    return out


def rendering(data, vcfg, cfg, params, text, *, clips: int, steps: int, seed: int = 0) -> dict:
    """{family: {"sample": [mse per latent frame], "still": [...]}} of the backbone's full-caption samples."""
    model = cogvideox.CogVideoXTransformer(cfg)
    idx = np.linspace(0, len(data["conditions"]) - 1, clips).round().astype(int)
    n = data["latent_dist"].shape[-1] // 2
    x0 = jnp.asarray(data["latent_dist"][idx][..., :n]) * vcfg.scaling_factor  # posterior means
    image = jnp.asarray(data["image_dist"][idx][..., :n]) * vcfg.scaling_factor
    caption = jnp.asarray(text["ids"][idx])
    schedule = sampling.DDIMSchedule.from_config(build.SCHEDULER).steps(steps)

    @jax.jit
    def sample(noise):
        cond = conditioning.pad_frames(image, noise.shape[1])
        denoise = lambda x, t, i: model.apply({"params": params}, jnp.concatenate([x, cond], -1), caption,  # noqa: E731
                                              jnp.full((x.shape[0],), t))
        return sampling.sample_loop(denoise, noise, schedule)

    z = sample(jax.random.normal(jax.random.PRNGKey(seed), x0.shape))
    still = jnp.repeat(x0[:, :1], x0.shape[1], axis=1)
    per_frame = lambda a: np.asarray(jnp.mean(jnp.square(a - x0), axis=(2, 3, 4)))  # noqa: E731  [clips, frames]
    err, still_err = per_frame(z), per_frame(still)
    families = np.array([world.CONDITIONS[world.SEEN[c]].family for c in data["conditions"][idx]])
    return {f: {"sample": err[families == f].mean(0).round(4).tolist(),
                "still": still_err[families == f].mean(0).round(4).tolist()}
            for f in world.FAMILIES if (families == f).any()}


def markdown(result: dict) -> str:
    lines = ["### Reference gain (v-loss on training pairs; lower is better)", "",
             "| noise band (t) | " + " | ".join(REFERENCES) + " |", "|---|" + "---|" * len(REFERENCES)]
    lines += [f"| {band} | " + " | ".join(f"{row[r]:.4f}" for r in REFERENCES) + " |"
              for band, row in result["reference_gain"].items()]
    lines += ["", "### Rendering (backbone, full caption: latent MSE per latent frame; a still video beside)", "",
              "| family | sample | still video |", "|---|---|---|"]
    lines += [f"| {f} | {' / '.join(f'{v:.4f}' for v in m['sample'])} | {' / '.join(f'{v:.4f}' for v in m['still'])} |"
              for f, m in result["rendering"].items()]
    return "\n".join(lines) + "\n"


def run(workdir: str, transformer: str, out: str, *, pairs: int, clips: int, steps: int, seed: int = 0) -> dict:
    data, vcfg, cfg, params, text = _load(workdir, transformer)
    result = {"transformer": transformer, "pairs": pairs, "clips": clips, "sample_steps": steps,
              "reference_gain": reference_gain(data, vcfg, cfg, params, text, pairs=pairs, seed=seed),
              "rendering": rendering(data, vcfg, cfg, params, text, clips=clips, steps=steps, seed=seed)}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "diagnose.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "diagnose.md"), "w") as f:
        f.write(markdown(result))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from vapjax.toy import ablate  # noqa: PLC0415 (the shipped default's workdir)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/toy_build.py", help="with --from-default: the build config")
    ap.add_argument("--workdir", default="runs/toy")
    ap.add_argument("--transformer", default=None,
                    help="the VAP transformer (default: <workdir>/expert/transformer, or the shipped one)")
    ap.add_argument("--from-default", action="store_true", help="make --workdir from the shipped default")
    ap.add_argument("--pool", type=int, default=16, help="with --from-default: training clips per condition")
    ap.add_argument("--out", default="eval/diagnose")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--clips", type=int, default=36)
    ap.add_argument("--sample-steps", type=int, default=20)
    a = ap.parse_args(argv)
    try:
        transformer = a.transformer
        if a.from_default:
            if a.pool < 2:
                raise ValueError(f"--pool {a.pool}: a training pair is one condition on two scenes, so at least 2")
            ablate.workdir_from_default(build.load_config(a.config), a.workdir, per_condition=a.pool)
            transformer = transformer or os.path.join(ablate.DEFAULT, "pipeline", "transformer")
        elif not os.path.exists(os.path.join(a.workdir, "encoded.npz")):
            raise FileNotFoundError(f"{a.workdir}: not a toy build workdir (python -m vapjax.toy.build), "
                                    "or pass --from-default")
        transformer = transformer or os.path.join(a.workdir, "expert", "transformer")
        if not os.path.isdir(transformer):
            raise FileNotFoundError(f"{transformer}: no such transformer folder")
        run(a.workdir, transformer, a.out, pairs=a.pairs, clips=a.clips, steps=a.sample_steps)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(open(os.path.join(a.out, "diagnose.md")).read())


if __name__ == "__main__":
    main()
