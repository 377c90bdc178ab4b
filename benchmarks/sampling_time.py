"""Sampling with CogVideoX-VAP, stage by stage, under one offload mode: T5, the VAE encode of the reference
clip, ONE denoising step with CFG (batch 2), the VAE decode — each compiled and timed on random weights
(generated on the device, released architecture, bf16; `--tiny`: the tiny test model in fp32) — and the
device's peak memory (jax memory_stats peak_bytes_in_use; None on CPU). One JSON line.

    python3 -m benchmarks.sampling_time                              # offload=encoders, every stage
    python3 -m benchmarks.sampling_time --offload int8 --stages denoise
    python3 -m benchmarks.sampling_time --tiny                       # CPU rehearsal

offload (vapjax.memory.OFFLOAD_MODES, plus int8): none (everything resident), encoders (T5 and VAE weights
on the host between uses), layers (also the transformer's layer stacks, streamed one layer per step),
int8 (encoders offloaded, the backbone's layer kernels stored as int8). `estimate_50_steps_s` = T5 + the
clip's VAE encode + 50 × the step + the decode (the two one-frame encodes of the image and the
reference's first frame are not counted). `first_s` of a stage includes its compilation, or its load
from the persistent cache (`--cache DIR`): a second process with the same DIR measures the warm start.
Imports only jax/flax/numpy and vapjax (no ml_collections: the GPU image lacks it).
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "encoders", "layers", "int8")
# configs/cog_vap_tiny.py's model, without ml_collections.
TINY = dict(transformer=dict(num_heads=2, head_dim=16, in_channels=32, out_channels=16, time_embed_dim=16,
                             text_embed_dim=32, num_layers=4, sample_height=8, sample_width=12, sample_frames=9,
                             max_text_seq_length=32, expert_layers=(0, 1, 2)),
            vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                     sample_height=64, sample_width=96),
            text_encoder=dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2),
            request=dict(height=64, width=96, num_frames=9, max_sequence_length=32))
FULL_REQUEST = dict(height=480, width=720, num_frames=49, max_sequence_length=226)


def device_random(shapes, seed: int, tiny: bool = False):
    """Random weights of `shapes` drawn on the device leaf by leaf (22 GB at full size: no host round
    trip; one small program per distinct shape, where one jit over every leaf compiles for minutes).
    `tiny`: drawn on the host instead (vapjax.random_init: no compilation at all)."""
    if tiny:
        from vapjax.random_init import random_params  # noqa: PLC0415
        return random_params(shapes, seed)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [_normal(k, s.shape, jnp.dtype(s.dtype)) for k, s in zip(keys, leaves)])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, dtype)).astype(dtype)


def build(tiny: bool, mode: str, attention: str | None):
    from vapjax.encoders import Encoders  # noqa: PLC0415
    from vapjax.models import cogvideox, cogvideox_vae, t5  # noqa: PLC0415
    from vapjax.pipelines.cogvideox_vap import SCHEDULER, CogVideoXVAP  # noqa: PLC0415
    from vapjax.pipelines.common import Component, Placement  # noqa: PLC0415
    from vapjax.sampling import DDIMSchedule  # noqa: PLC0415

    dt = "float32" if tiny else "bfloat16"
    sizes = TINY if tiny else {}
    tcfg = cogvideox.CogVideoXConfig(**sizes.get("transformer", {}), dtype=dt, param_dtype=dt, attention=attention)
    vcfg = cogvideox_vae.VAEConfig(**sizes.get("vae", {}), dtype=dt, param_dtype=dt)
    ecfg = t5.T5Config(**sizes.get("text_encoder", {}), dtype=dt, param_dtype=dt)
    key = jax.random.PRNGKey(0)
    shapes = lambda init, cfg: jax.eval_shape(lambda k: init(cfg, k), key)  # noqa: E731
    encoders = Encoders(vcfg, device_random(shapes(cogvideox_vae.init_params, vcfg), 1, tiny), ecfg,
                        device_random(shapes(t5.init_params, ecfg), 2, tiny), None, devices=jax.local_devices()[:1],
                        offload=mode != "none")
    placement = Placement(stream=mode == "layers", quantize="int8" if mode == "int8" else "")
    return CogVideoXVAP(Component(tcfg, device_random(cogvideox.param_shapes(tcfg), 0, tiny)), encoders,
                        DDIMSchedule.from_config(SCHEDULER), placement)


def concrete(args, steps):
    """A stage's abstract inputs as arrays (its weights are already arrays); the step table is the real one."""
    def fill(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.zeros(x.shape, x.dtype)
        return jax.random.normal(jax.random.PRNGKey(x.size % 997), x.shape, jnp.float32).astype(x.dtype)
    args = list(args)
    if len(args) == 8:  # the denoising loop: (params, x, image, ref, text, ref_text, steps, scales)
        args[6] = jax.tree.map(jnp.asarray, steps)
        args[7] = jnp.full(args[7].shape, 6.0, jnp.float32)
    return [args[0]] + [jax.tree.map(fill, a) for a in args[1:]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--offload", choices=MODES, default="encoders")
    ap.add_argument("--stages", choices=["all", "denoise"], default="all")
    ap.add_argument("--attention", default=None, help="vapjax.attention: None (auto), xla, cudnn, blockwise")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", default="", help="a persistent compilation cache folder (vapjax.compile_cache)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (CPU rehearsal)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.cache:
        from vapjax import compile_cache  # noqa: PLC0415
        compile_cache.enable(args.cache)
    from vapjax.pipelines.cogvideox_vap import Request  # noqa: PLC0415

    pipe = build(args.tiny, args.offload, args.attention)
    weights_s = time.perf_counter() - t_start
    req = Request(prompt="", ref_prompts=("",), steps=1, **(TINY["request"] if args.tiny else FULL_REQUEST))
    steps = pipe.schedule.steps(req.steps)
    stages = {}
    for stage in pipe.stages(req):
        if args.stages == "denoise" and stage.component != "transformer":
            continue
        run_args = concrete(stage.args, steps)
        call = lambda: jax.block_until_ready(stage.fn(*run_args, **stage.static))  # noqa: E731
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        stages[stage.name] = {"first_s": first, "median_s": float(np.median(times)), "times_s": times}
    by = {name.split(" (")[0]: s["median_s"] for name, s in stages.items()}
    estimate = (by["text encoder"] + by["VAE encode"] + 50 * by["denoise"] + by["VAE decode"]
                if args.stages == "all" else None)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    print(json.dumps({"bench": "sampling", "offload": args.offload, "device": dev.device_kind, "tiny": args.tiny,
                      "request": f"{req.num_frames}x{req.height}x{req.width}, CFG batch 2, 1 reference",
                      "step_s": by["denoise"], "estimate_50_steps_s": estimate, "weights_s": weights_s,
                      "stages": stages, "cache": bool(args.cache),
                      "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None}))


if __name__ == "__main__":
    main()
