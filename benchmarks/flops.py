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


def layer_flops(cfg, batch=2, frames=49, height=480, width=720, refs=1) -> tuple[float, float]:
    """XLA FLOPs of one joint (expert) layer and one plain layer at these sizes."""
    f = (frames - 1) // cfg.temporal_compression_ratio + 1
    gh, gw = height // 8 // cfg.patch_size, width // 8 // cfg.patch_size
    dt = jnp.dtype(cfg.dtype)
    tok = lambda n: jax.ShapeDtypeStruct((batch, n, cfg.dim), dt)
    emb = jax.ShapeDtypeStruct((batch, cfg.time_embed_dim), dt)
    block = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                         cogvideox.param_shapes(cfg.with_options(num_layers=1, expert_layers=()))["backbone"]["blocks"])
    video, text = tok(f * gh * gw), tok(cfg.max_text_seq_length)
    ref_video, ref_text = tok(refs * f * gh * gw), tok(refs * cfg.max_text_seq_length)

    def joint(pb, pe, state, e):
        rope = cogvideox.rope_tables(*cogvideox.rope_positions(cfg, f, gh, gw), cfg.head_dim)
        rope_r = cogvideox.rope_tables(*cogvideox.rope_positions(cfg, f, gh, gw, refs), cfg.head_dim)
        return cogvideox._joint_layer(cfg, pb, pe, state, e, e, rope, rope_r)

    def plain(pb, state, e):
        rope = cogvideox.rope_tables(*cogvideox.rope_positions(cfg, f, gh, gw), cfg.head_dim)
        return cogvideox.Block(cfg, parent=None).apply({"params": pb}, *state, e, rope)

    j = jax.jit(joint).lower(block, block, (video, text, ref_video, ref_text), emb).cost_analysis()["flops"]
    p = jax.jit(plain).lower(block, (video, text), emb).cost_analysis()["flops"]
    return j, p


def main():
    ap = argparse.ArgumentParser()
    for name, default in (("batch", 2), ("frames", 49), ("height", 480), ("width", 720), ("refs", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    sizes = vars(ap.parse_args())
    cfg = cogvideox.CogVideoXConfig(dtype="bfloat16", param_dtype="bfloat16")
    lowered = lower_forward(cfg, **sizes).cost_analysis()["flops"]
    joint, plain = layer_flops(cfg, **sizes)
    runs = cogvideox.layer_runs(cfg.num_layers, cfg.expert_layers)
    # A lax.scan body is counted once by cost_analysis: add the remaining trips of every run.
    xla = lowered + sum((stop - start - 1) * (joint if j else plain) for start, stop, j in runs)
    ana = analytic_flops(cfg, **sizes)
    print(f"sizes {sizes}")
    print(f"XLA cost_analysis (scan trips added): {xla / 1e15:7.3f} PFLOP   "
          f"[one joint layer {joint / 1e12:.1f} TFLOP, one plain layer {plain / 1e12:.1f} TFLOP]")
    print(f"analytic matmul FLOPs               : {ana / 1e15:7.3f} PFLOP   (ratio XLA/analytic {xla / ana:.3f})")


if __name__ == "__main__":
    main()
