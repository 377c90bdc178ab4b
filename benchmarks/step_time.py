"""Step time, peak device memory and MFU of the CogVideoX-VAP transformer: one sampling forward
(CFG batch) or one training step (expert only, backbone frozen), on synthetic inputs.

    python -m benchmarks.step_time --what forward --batch 2            # full size: one DDIM step with CFG
    python -m benchmarks.step_time --what train --batch 1 --remat full  # full size: one training step
    python -m benchmarks.step_time --tiny --what train                  # smoke test on CPU
    python -m benchmarks.step_time --what train --moments bfloat16      # what fits one 80 GB H100

A full-size training step holds the bf16 weights (22.2 GB), the expert's gradients (10.9 GB) and AdamW's
two moments: in fp32 (the recipe, 43.5 GB) that is ~71 GiB before activations, more than one H100
(~78 GiB, of which XLA takes 75 % by default); bf16 moments (21.8 GB) fit, with
XLA_PYTHON_CLIENT_MEM_FRACTION=.95. Imports no config file (ml_collections is not in the GPU image).

MFU = model FLOPs / (time × peak): forward = analytic matmul FLOPs (benchmarks.flops); a training
step counts 3× forward (forward + backward through both streams; weight gradients exist only for
the expert, so this slightly overstates the useful work). Recomputation under remat is not counted.
"""
from __future__ import annotations

import argparse
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.flops import analytic_flops, forward_shapes
from vapjax import sharding, training
from vapjax.models import cogvideox

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 TFLOP/s (SXM)
# The official recipe's optimizer, as configs/cog_vap_train.py sets it (tests/test_benchmarks.py keeps the two equal).
RECIPE_OPTIMIZER = dict(learning_rate=1e-5, warmup_steps=1000, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=1e-4,
                        grad_clip=1.0, fp32_moments=True, grad_accum=1)


def synthetic_params(cfg, mesh, tiny: bool = False):
    """Random weights generated on device, already sharded (22 GB at full size: no host round trip).
    `tiny`: drawn on the host (vapjax.random_init), as one jit over every leaf compiles for minutes on CPU."""
    shapes = cogvideox.param_shapes(cfg)
    shardings = sharding.param_shardings(shapes, mesh)
    if tiny:
        from vapjax.random_init import random_params  # noqa: PLC0415
        return jax.device_put(random_params(shapes, 0), shardings)
    leaves, treedef = jax.tree.flatten(shapes)

    def make(key):
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])

    return jax.jit(make, out_shardings=shardings)(jax.random.PRNGKey(0))


def timed(fn, *args, repeats=5):
    """(median, times, first call): the first call compiles, so first − median ≈ compile time."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))                    # compile + warm up
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times, first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=["forward", "train"], default="forward")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--attention", default=None, help="vapjax.attention: None (auto), xla, cudnn, blockwise")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--moments", choices=["float32", "bfloat16"], default="float32",
                    help="AdamW moments (train): float32 as the recipe, bfloat16 to fit one 80 GB GPU")
    args = ap.parse_args()

    dtype = "float32" if args.tiny else "bfloat16"
    cfg = cogvideox.CogVideoXConfig(dtype=dtype, param_dtype=dtype, attention=args.attention, remat=args.remat)
    sizes = dict(batch=args.batch, frames=49, height=480, width=720, refs=args.refs)
    if args.tiny:
        cfg = cfg.with_options(num_heads=2, head_dim=16, time_embed_dim=16, text_embed_dim=16, num_layers=3,
                               sample_height=4, sample_width=6, max_text_seq_length=8, expert_layers=(0, 1))
        sizes.update(frames=49, height=32, width=48)
    mesh = sharding.make_mesh(data=1, fsdp=-1)
    params = synthetic_params(cfg, mesh, tiny=args.tiny)
    lat, txt, t, ref, ref_txt = forward_shapes(cfg, **sizes)
    rand = lambda s, k: jax.random.normal(jax.random.PRNGKey(k), s.shape, s.dtype)
    inputs = (rand(lat, 1), rand(txt, 2), jnp.full(t.shape, 500.0), rand(ref, 3), rand(ref_txt, 4))
    model = cogvideox.CogVideoXTransformer(cfg)

    if args.what == "forward":
        fn = jax.jit(lambda p, *x: model.apply({"params": p}, *x))
        run_args = (params, *inputs)
        flops = analytic_flops(cfg, **sizes)
    else:  # the real train.py step: official objective, AdamW on the expert, backbone frozen
        from vapjax.pipelines.cogvideox_vap import SCHEDULER  # noqa: PLC0415 (CogVideoX-5B's, as the recipe's)
        from vapjax.sampling import DDIMSchedule  # noqa: PLC0415
        opt = types.SimpleNamespace(**{**RECIPE_OPTIMIZER, "fp32_moments": args.moments == "float32"})
        tx = training.make_optimizer(opt)
        trainable, frozen = training.split_params(params)
        state = jax.jit(lambda p: training.init_state(p, tx))(trainable)
        objective = training.cogvideox_objective(model, DDIMSchedule.from_config(SCHEDULER).alphas_cumprod,
                                                 scaling_factor=0.7, caption_dropout=0.02, dtype=jnp.dtype(cfg.dtype))
        step = training.make_train_step(objective, tx, training.learning_rate(opt))
        jstep = jax.jit(step, donate_argnums=(0,))
        b, n, f = args.batch, args.refs, lat.shape[1]
        hw = lat.shape[2:4]
        c2 = 2 * cfg.out_channels
        batch = {"latent_dist": (b, f, *hw, c2), "image_dist": (b, 1, *hw, c2), "text": txt.shape,
                 "ref_latent_dist": (b, n, f, *hw, c2), "ref_image_dist": (b, n, 1, *hw, c2),
                 "ref_text": (b, n) + txt.shape[1:]}
        batch = {k: jax.random.normal(jax.random.PRNGKey(i), s, jnp.float32) for i, (k, s) in enumerate(batch.items())}
        empty = jnp.zeros(txt.shape[1:], jnp.float32)
        holder = {"state": state}

        def fn():  # the state is donated: feed each step the previous step's output
            holder["state"], metrics = jstep(holder["state"], frozen, batch, jax.random.PRNGKey(0), empty)
            return metrics["loss"]

        run_args = ()
        flops = 3 * analytic_flops(cfg, **sizes)

    median, times, first = timed(fn, *run_args, repeats=args.repeats)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), None)
    result = {"bench": f"step_time_{args.what}", "what": args.what, "moments": args.moments if args.what == "train" else None,
              "expert_layers": len(cfg.expert_layers), "device": dev.device_kind, "batch": args.batch, "refs": args.refs,
              "remat": args.remat, "attention": args.attention, "tiny": args.tiny,
              "median_s": median, "times_s": times, "compile_s": first - median, "tflops": flops / median / 1e12,
              "mfu": flops / median / peak if peak else None,
              "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
