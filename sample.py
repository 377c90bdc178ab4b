"""Generate a video with Video-As-Prompt (CogVideoX) in JAX.

    python sample.py --config configs/cog_vap_tiny.py                  # tiny random model, no download
    python sample.py --config configs/cog_vap.py --config.checkpoint=... --config.image=... \
        --config.ref_video=... --config.prompt=... --config.ref_prompt=...

Bad input (missing or unreadable files, a too-short reference for "first"/"random", an impossible
resolution, a folder that is not a converted checkpoint, a setting that cannot take effect) ends with
one `error: ...` line and exit status 2.
"""
import resource
import sys
import time
import warnings

import jax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from vapjax import video
from vapjax.checkpoint import CheckpointError
from vapjax.models import cogvideox, cogvideox_vae, t5
from vapjax.pipelines.cogvideox_vap import CogVideoXVAP, Request
from vapjax.video import VideoError

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/cog_vap.py", lock_config=False)


def check_settings(c) -> None:
    """A setting that cannot take effect is an error naming it, not silently ignored."""
    if c.random_init and c.checkpoint:
        raise ValueError(f"--config.checkpoint={c.checkpoint} has no effect with random_init=True (random "
                         "weights from config.model): drop one of them")
    if c.random_init and "model" not in c:
        raise ValueError("random_init=True needs config.model (the random model's sizes, see configs/cog_vap_tiny.py)")
    if not c.random_init and not c.checkpoint:
        raise ValueError("no checkpoint: pass --config.checkpoint=<converted pipeline folder>")
    if c.guidance_scale <= 1 and c.dynamic_cfg:
        raise ValueError(f"dynamic_cfg=True has no effect with guidance_scale={c.guidance_scale} (no "
                         "classifier-free guidance at <= 1): set --config.dynamic_cfg=False")
    if c.frames_per_reference_length and c.frames_selection != "evenly":
        raise ValueError(f"frames_per_reference_length=True has no effect with frames_selection="
                         f"{c.frames_selection!r} (it only changes 'evenly')")


def build_pipeline(c) -> CogVideoXVAP:
    if c.random_init:
        m = c.model
        return CogVideoXVAP.random(
            cogvideox.CogVideoXConfig(**m.transformer.to_dict(), dtype=c.dtype or "float32",
                                      param_dtype=c.dtype or "float32", attention=c.attention or None),
            cogvideox_vae.VAEConfig(**m.vae.to_dict()), t5.T5Config(**m.text_encoder.to_dict()),
            m.tokenizer, m.scheduler.to_dict(), seed=m.seed, tiling=c.vae_tiling)
    return CogVideoXVAP.load(c.checkpoint, dtype=c.dtype or None, attention=c.attention or None,
                             tiling=c.vae_tiling)


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    dev = f"device peak {stats['peak_bytes_in_use'] / 2 ** 30:.2f} GiB, " if "peak_bytes_in_use" in stats else ""
    return f"{dev}host peak RSS {host:.2f} GiB"


def run(c) -> None:
    check_settings(c)
    ref_paths = [p for p in c.ref_video.split("|") if p]
    ref_prompts = tuple(c.ref_prompt.split("|")) if c.ref_prompt else ()
    if not c.image or not ref_paths:
        raise ValueError("pass --config.image=<image> and --config.ref_video=<reference video>")
    image = video.read_image(c.image)
    refs = []
    for p in ref_paths:
        frames, _ = video.read_video(p)
        if c.frames_selection != "evenly":  # "evenly" repeats frames of a short reference, as the official
            video.require_frames(p, frames, c.num_frames)
        refs.append(frames)
    req = Request(prompt=c.prompt, ref_prompts=ref_prompts, negative_prompt=c.negative_prompt,
                  negative_ref_prompt=c.negative_ref_prompt, height=c.height, width=c.width,
                  num_frames=c.num_frames, steps=c.steps, guidance_scale=c.guidance_scale,
                  dynamic_cfg=c.dynamic_cfg, max_sequence_length=c.max_sequence_length,
                  frames_selection=c.frames_selection, frames_per_reference_length=c.frames_per_reference_length,
                  posterior=c.posterior, seed=c.seed)

    t0 = time.time()
    pipe = build_pipeline(c)
    t_load = time.time() - t0
    pipe.validate(image, refs, req)
    bar = tqdm(total=c.steps, desc="denoising", unit="step")
    t1 = time.time()
    out = pipe(image, refs, req, progress=lambda i: bar.update(1))
    bar.close()
    t_gen = time.time() - t1
    video.write_video(c.output, out.frames, fps=c.fps)
    print(f"wrote {c.output}: {out.frames.shape[0]} frames {out.frames.shape[2]}x{out.frames.shape[1]}")
    print(f"time: load {t_load:.1f}s, generate {t_gen:.1f}s (incl. compilation)")
    print(f"memory: {peak_memory()}")


def main(argv):
    del argv
    # imageio's ffmpeg subprocess (fork + immediate exec) trips JAX's at-fork warning; it is harmless.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    logging.set_verbosity(logging.WARNING)  # absl would print JAX's backend probing at INFO
    try:
        run(_CONFIG.value)
    except (VideoError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
