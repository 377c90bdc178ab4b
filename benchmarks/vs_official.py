"""vapjax against the official PyTorch implementation, side by side in one process, on one machine.

--what forward: build one CogVideoX-VAP configuration with random weights in the official model, time its
forward (warm, median of --repeats), convert its state dict in memory with our converter's rules (no disk
round trip), free the official model, run ours on the same weights and inputs, and print ONE JSON line
with both times, the ratio ours / official and the relative error of the outputs (`agree`: within the
dtype's tolerance; at full size this is the bf16 agreement check).
--what train: the official training step alone (only `_mot_ref` weights train, per-block activation
checkpointing, AdamW) — ours is `python -m benchmarks.step_time --what train`.

The official model class lives in the diffusers fork inside bytedance/Video-As-Prompt (not on PyPI);
point --repo at a checkout of that repository. Nothing of it is copied here: its `diffusers/src` is put
first on sys.path for this process only.

    python -m benchmarks.vs_official --repo Video-As-Prompt --config mid                    # CPU, fp32
    python -m benchmarks.vs_official --repo Video-As-Prompt --config full                   # GPU, bf16
    python -m benchmarks.vs_official --repo Video-As-Prompt --config full --what train --batch 1
    python -m benchmarks.vs_official --repo Video-As-Prompt --config tiny                   # smoke test

Configurations (batch 2 = one sampling step with classifier-free guidance, one reference):
  tiny  2 heads × 16, 3 layers (experts on 0, 1), latent 13 × 4 × 6, text 8, fp32
  mid   8 heads × 64, 4 layers (all with experts), latent 5 × 32 × 48, text 226, fp32: 4 292 joint tokens
  full  CogVideoX-5B-I2V + VAP (48 heads × 64, 42 layers, experts on 0–40), latent 13 × 60 × 90
        (49 frames 480 × 720), bf16: 35 552 joint tokens, 2 × (226 + 13·30·45) (needs a GPU)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import gc
import sys
import time

import numpy as np

COG_5B_I2V_VAP = dict(num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16,
                      time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60,
                      sample_frames=49, patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True,
                      use_learned_positional_embeddings=True, block_idx_with_mot_ref=list(range(41)))
CONFIGS = {  # diffusers config (the latent size is the model's sample size), compute dtype
    "tiny": (dict(COG_5B_I2V_VAP, num_attention_heads=2, attention_head_dim=16, time_embed_dim=16, text_embed_dim=16,
                  num_layers=3, sample_width=6, sample_height=4, max_text_seq_length=8, block_idx_with_mot_ref=[0, 1]),
             "float32"),
    "mid": (dict(COG_5B_I2V_VAP, num_attention_heads=8, num_layers=4, sample_width=48, sample_height=32,
                 sample_frames=17, block_idx_with_mot_ref=[0, 1, 2, 3]), "float32"),
    "full": (COG_5B_I2V_VAP, "bfloat16"),
}
# Output agreement, ‖ours − official‖ / ‖official‖: fp32 ports agree to ~1e-6 (tests/test_golden.py);
# bf16 rounds differently in each framework at every layer.
AGREE = {"float32": 1e-4, "bfloat16": 5e-2}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, help="a checkout of bytedance/Video-As-Prompt")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    ap.add_argument("--what", choices=["forward", "train"], default="forward")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--attention", default=None, help="ours: None (auto), xla, cudnn, blockwise")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = os.path.join(os.path.abspath(args.repo), "diffusers", "src")
    if not os.path.isfile(os.path.join(src, "diffusers", "models", "transformers", "cogvideox_transformer_3d_mot.py")):
        sys.exit(f"--repo {args.repo}: no diffusers/src/.../cogvideox_transformer_3d_mot.py (a Video-As-Prompt checkout?)")
    sys.path.insert(0, src)
    # Torch and JAX share one GPU here: JAX must not grab 75 % of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.what == "train":
        print(json.dumps(official_train_step(args)))
        return
    print(json.dumps(forward_side_by_side(args)))


def _official(args):
    """The official model with torch's random init (seed 0), its inputs, and how to call it."""
    import torch  # noqa: PLC0415 (heavy, optional: only this script needs torch)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: PLC0415 (the fork's)
    from diffusers.models.transformers.cogvideox_transformer_3d_mot import CogVideoXTransformer3DMOTModel  # noqa: PLC0415

    from benchmarks import torch_threads  # noqa: PLC0415
    from vapjax.models.cogvideox import crop_region  # noqa: PLC0415 (the fork's pipeline module needs old transformers)

    cfg, dtype_name = CONFIGS[args.config]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.config == "full" and device == "cpu":
        sys.exit("--config full needs torch with CUDA and a GPU (the official model would take hours on a CPU)")
    if device == "cpu":
        torch_threads()
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)             # full size: build the 11 B parameters directly in bf16, on the device
    with torch.device(device), contextlib.redirect_stdout(sys.stderr):  # it prints its expert layers
        model = CogVideoXTransformer3DMOTModel(**cfg)
    torch.set_default_dtype(torch.float32)
    b, n, p = args.batch, args.refs, cfg["patch_size"]
    f = (cfg["sample_frames"] - 1) // 4 + 1
    h, w = cfg["sample_height"], cfg["sample_width"]
    rng = np.random.default_rng(0)
    inputs = {  # official layout [B, F, C, H, W]; latents are noisy target ⊕ image condition (in_channels)
        "hidden_states": rng.standard_normal((b, f, cfg["in_channels"], h, w), np.float32),
        "encoder_hidden_states": rng.standard_normal((b, cfg["max_text_seq_length"], cfg["text_embed_dim"]), np.float32),
        "hidden_states_mot_ref": rng.standard_normal((b, n * f, cfg["in_channels"], h, w), np.float32),
        "encoder_hidden_states_mot_ref": rng.standard_normal((b, n * cfg["max_text_seq_length"], cfg["text_embed_dim"]),
                                                             np.float32),
    }
    t = torch.full((b,), 500, device=device)
    crops = crop_region(h // p, w // p, h // p, w // p)
    rope = get_3d_rotary_pos_embed(cfg["attention_head_dim"], crops, (h // p, w // p), f, device=device)
    rope_ref = get_3d_rotary_pos_embed(cfg["attention_head_dim"], crops, (h // p, w // p), f, device=device, mot_num=n)
    x = {k: torch.from_numpy(a).to(device, dtype) for k, a in inputs.items()}

    def call():
        return model(x["hidden_states"], x["encoder_hidden_states"], t, image_rotary_emb=rope, return_dict=False,
                     num_mot_ref=n, hidden_states_mot_ref=x["hidden_states_mot_ref"],
                     encoder_hidden_states_mot_ref=x["encoder_hidden_states_mot_ref"],
                     image_rotary_emb_mot_ref=rope_ref)[0]

    return torch, model, inputs, call, device


def _timed(step, sync, repeats):
    step()
    sync()                                      # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


def converted_state_dict(model, dtype_name: str, put):
    """(config, params): the official torch model's weights as our tree, in memory, by the converter's
    own rules and checks (convert.cogvideox; every key consumed, every parameter filled)."""
    import ml_dtypes  # noqa: PLC0415

    from convert.cogvideox import rules, target_shapes  # noqa: PLC0415
    from convert.core import assemble, check  # noqa: PLC0415
    from vapjax.models import cogvideox  # noqa: PLC0415

    cfg = cogvideox.CogVideoXConfig.from_diffusers(dict(model.config), dtype=dtype_name, param_dtype=dtype_name)
    state = model.state_dict()
    targets = target_shapes(cfg)
    rs = rules(cfg, targets)
    check({k: tuple(v.shape) for k, v in state.items()}, rs, targets, what="the official model's state dict")
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    # torch's bf16 has no numpy view: through fp32 on the host, one tensor at a time, then our dtype.
    load = lambda k: state[k].detach().to("cpu").float().numpy().astype(dtype)  # noqa: E731
    return cfg, assemble(load, rs, targets, dtype=dtype, put=put)


def forward_side_by_side(args):
    torch, model, inputs, call, device = _official(args)
    model.eval()
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        official_s, official_times = _timed(call, sync, args.repeats)
        want = call().float().cpu().numpy()
    official_peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None

    import jax  # noqa: PLC0415 (after the env setting in main)
    import jax.numpy as jnp  # noqa: PLC0415

    from vapjax import attention as attn  # noqa: PLC0415
    from vapjax.models import cogvideox  # noqa: PLC0415

    _, dtype_name = CONFIGS[args.config]
    dtype = jnp.dtype(dtype_name)
    t0 = time.perf_counter()
    cfg, params = converted_state_dict(model, dtype_name, put=lambda _, a: jax.device_put(a))
    weights_s = time.perf_counter() - t0
    # Free the official model before ours runs: `call` holds it (and its inputs) too, so drop every
    # reference, collect, and hand torch's cached blocks back to the driver (22 GB at full size).
    del model, call
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    official_left = torch.cuda.memory_allocated() / 2 ** 30 if cuda else None
    cfg = cfg.with_options(dtype=dtype_name, param_dtype=dtype_name, attention=args.attention)
    model = cogvideox.CogVideoXTransformer(cfg)
    cl = lambda a: jnp.asarray(a.transpose(0, 1, 3, 4, 2), dtype)  # → channels-last [B, F, H, W, C]
    x = (cl(inputs["hidden_states"]), jnp.asarray(inputs["encoder_hidden_states"], dtype),
         jnp.full((args.batch,), 500.0, jnp.float32), cl(inputs["hidden_states_mot_ref"]),
         jnp.asarray(inputs["encoder_hidden_states_mot_ref"], dtype))
    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, *x).compile()
    compile_s = time.perf_counter() - t0
    ours_s, ours_times = _timed(lambda: jax.block_until_ready(compiled(params, *x)), lambda: None, args.repeats)
    got = np.asarray(compiled(params, *x), np.float32).transpose(0, 1, 4, 2, 3)
    err = float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))
    stats = jax.devices()[0].memory_stats() or {}
    tokens = (1 + args.refs) * (cfg.max_text_seq_length + cfg.latent_frames * (cfg.sample_height // cfg.patch_size)
                                * (cfg.sample_width // cfg.patch_size))
    return {"bench": "vs_official", "what": "forward", "config": args.config, "dtype": dtype_name,
            "device": jax.devices()[0].device_kind, "batch": args.batch, "refs": args.refs, "joint_tokens": tokens,
            "attention": attn.resolve(args.attention, *2 * [(args.batch, tokens, cfg.num_heads, cfg.head_dim)], dtype),
            "official_s": official_s, "ours_s": ours_s, "ratio_ours_over_official": ours_s / official_s,
            "official_times_s": official_times, "ours_times_s": ours_times, "ours_compile_s": compile_s,
            "weights_s": weights_s, "rel_err": err, "agree": err <= AGREE[dtype_name], "agree_tol": AGREE[dtype_name],
            "official_peak_gib": official_peak, "official_left_gib": official_left,
            "ours_peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None}


def official_train_step(args):
    """As the official trainer: only `_mot_ref` weights train, per-block checkpointing, AdamW."""
    torch, model, _, call, device = _official(args)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("_mot_ref" in name)
    # finetrainers wraps every block in activation checkpointing (full recompute); diffusers' own
    # enable_gradient_checkpointing does not pass the MoT keyword arguments through.
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415
    for block in model.transformer_blocks:
        block.forward = (lambda fwd: lambda *a, **k: checkpoint(fwd, *a, use_reentrant=False, **k))(block.forward)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-4)

    def step():
        loss = call().float().square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    median, times = _timed(step, torch.cuda.synchronize if cuda else (lambda: None), args.repeats)
    return {"bench": "vs_official", "what": "train", "impl": "pytorch-official", "config": args.config,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "batch": args.batch, "refs": args.refs,
            "median_s": median, "times_s": times,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}


if __name__ == "__main__":
    main()
