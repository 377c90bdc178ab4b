"""FLOPs of the full-size CogVideoX-5B-I2V + VAP forward: XLA's cost analysis vs. an analytic count.

    python -m benchmarks.flops [--batch 2] [--frames 49] [--height 480] [--width 720] [--refs 1]

Runs from ShapeDtypeStructs: nothing is allocated, no GPU needed.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from vapjax.models import cogvideox


def forward_shapes(cfg, batch=2, frames=49, height=480, width=720, refs=1):
    f = (frames - 1) // cfg.temporal_compression_ratio + 1
    lat = jax.ShapeDtypeStruct((batch, f, height // 8, width // 8, cfg.in_channels), jnp.dtype(cfg.dtype))
    txt = jax.ShapeDtypeStruct((batch, cfg.max_text_seq_length, cfg.text_embed_dim), jnp.dtype(cfg.dtype))
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    ref = jax.ShapeDtypeStruct((batch, refs * f) + lat.shape[2:], lat.dtype)
    ref_txt = jax.ShapeDtypeStruct((batch, refs * cfg.max_text_seq_length, cfg.text_embed_dim), txt.dtype)
    return lat, txt, t, ref, ref_txt


def lower_forward(cfg, **sizes):
    params = cogvideox.param_shapes(cfg)
    model = cogvideox.CogVideoXTransformer(cfg)
    fwd = jax.jit(lambda p, *x: model.apply({"params": p}, *x))
    return fwd.lower(params, *forward_shapes(cfg, **sizes))


def analytic_flops(cfg, batch=2, frames=49, height=480, width=720, refs=1) -> float:
    """Matmul FLOPs (2·m·n·k) of the forward; norms, RoPE and softmax are ignored."""
    d, s_txt = cfg.dim, cfg.max_text_seq_length
    f = (frames - 1) // cfg.temporal_compression_ratio + 1
    tokens = f * (height // 8 // cfg.patch_size) * (width // 8 // cfg.patch_size)
    tgt, ref = s_txt + tokens, refs * (s_txt + tokens)
    per_token_layer = 2 * d * (4 * d + 2 * 4 * d)                 # q,k,v,out + FFN (4x)
    mod = 2 * cfg.time_embed_dim * 6 * d * 2                      # two adaLN linears per token-stream (per sample)
    total = 0.0
    for layer in range(cfg.num_layers):
        joint = layer in cfg.expert_layers
        n = tgt + (ref if joint else 0)
        total += per_token_layer * n + 2 * 2 * n * n * d + mod * (2 if joint else 1)
    embed = 2 * (tokens * cfg.in_channels * cfg.patch_size ** 2 + s_txt * cfg.text_embed_dim) * d * (1 + refs)
    head = 2 * tokens * d * cfg.patch_size ** 2 * cfg.out_channels
    return batch * (total + embed + head)


def main():
    ap = argparse.ArgumentParser()
    for name, default in (("batch", 2), ("frames", 49), ("height", 480), ("width", 720), ("refs", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    sizes = vars(ap.parse_args())
    cfg = cogvideox.CogVideoXConfig(dtype="bfloat16", param_dtype="bfloat16")
    lowered = lower_forward(cfg, **sizes)
    xla = lowered.cost_analysis() or {}
    xla_flops = xla.get("flops", float("nan"))
    ana = analytic_flops(cfg, **sizes)
    body = analytic_flops(cfg.with_options(num_layers=1, expert_layers=(0,)), **sizes)
    print(f"sizes {sizes}")
    print(f"analytic matmul FLOPs : {ana / 1e15:8.3f} PFLOP")
    print(f"XLA cost_analysis     : {xla_flops / 1e15:8.3f} PFLOP (lowered HLO; a scanned layer stack may be "
          f"counted once per loop body, one expert layer ≈ {body / 1e15:.3f} PFLOP)")


if __name__ == "__main__":
    main()
