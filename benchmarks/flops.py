"""FLOPs of the full-size VAP forward: XLA's cost analysis vs. an analytic count.

    python -m benchmarks.flops [--batch 2] [--frames 49] [--height 480] [--width 720] [--refs 1]
    python -m benchmarks.flops --model wan [--experts d10|d20|all] [--width 832]   # Wan2.1-I2V-14B + VAP

Runs from ShapeDtypeStructs: nothing is allocated, no GPU needed.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from vapjax.models import cogvideox, wan


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


# ---------------------------------------------------------------------------------------------
# Wan2.1-I2V-14B + VAP (one reference; CFG as batch 2)
# ---------------------------------------------------------------------------------------------

def wan_forward_shapes(cfg, batch=2, frames=49, height=480, width=832, refs=1):
    f = (frames - 1) // 4 + 1                                   # Wan VAE: 4x temporal, 8x spatial
    dt = jnp.dtype(cfg.dtype)
    lat = jax.ShapeDtypeStruct((batch, f, height // 8, width // 8, cfg.in_channels), dt)
    txt = jax.ShapeDtypeStruct((batch, wan.TEXT_TOKENS, cfg.text_dim), dt)
    img = jax.ShapeDtypeStruct((batch, wan.IMAGE_TOKENS, cfg.image_dim), dt)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    return (lat, txt, img, t) + ((lat, txt, img) if refs else ())


def lower_wan_forward(cfg, **sizes):
    params = wan.param_shapes(cfg)
    model = wan.WanTransformer(cfg)
    fwd = jax.jit(lambda p, *x: model.apply({"params": p}, *x))
    return fwd.lower(params, *wan_forward_shapes(cfg, **sizes))


def wan_analytic_flops(cfg, batch=2, frames=49, height=480, width=832, refs=1) -> float:
    """Matmul FLOPs (2·m·n·k) of the Wan forward; norms, RoPE and softmax are ignored."""
    d, ctx_txt, ctx_img = cfg.dim, wan.TEXT_TOKENS, wan.IMAGE_TOKENS
    pt, ph, pw = cfg.patch_size
    f = (frames - 1) // 4 + 1
    s = (f // pt) * (height // 8 // ph) * (width // 8 // pw)   # video tokens per stream
    per_token = 2 * d * (4 * d + 2 * d + 2 * cfg.ffn_dim)     # q,k,v,out; cross q,out; FFN
    cross = 2 * 2 * (ctx_txt + ctx_img) * d * d + 4 * s * (ctx_txt + ctx_img) * d   # context k,v + attention
    total = 0.0
    for layer in range(cfg.num_layers):
        streams = 2 if (refs and layer in cfg.expert_layers) else 1
        n = streams * s
        total += per_token * n + 4 * n * n * d + streams * cross
    embed = (2 * s * cfg.in_channels * pt * ph * pw * d + 2 * ctx_txt * (cfg.text_dim + d) * d
             + 2 * ctx_img * (cfg.image_dim + d) * cfg.image_dim + 2 * (cfg.freq_dim * d + d * d + 6 * d * d))
    head = 2 * s * d * pt * ph * pw * cfg.out_channels
    return batch * (total + embed * (1 + (1 if refs and cfg.expert_layers else 0)) + head)


def wan_layer_flops(cfg, batch=2, frames=49, height=480, width=832) -> tuple[float, float]:
    """XLA FLOPs of one joint (expert) layer and one plain layer at these sizes."""
    f = (frames - 1) // 4 + 1
    grid = (f // cfg.patch_size[0], height // 8 // cfg.patch_size[1], width // 8 // cfg.patch_size[2])
    dt = jnp.dtype(cfg.dtype)
    tok = lambda n: jax.ShapeDtypeStruct((batch, n, cfg.dim), dt)
    temb_proj = jax.ShapeDtypeStruct((batch, 6 * cfg.dim), dt)
    context = (tok(wan.TEXT_TOKENS), tok(wan.IMAGE_TOKENS))
    one = cfg.with_options(num_layers=1, expert_layers=(0,))
    shapes = wan.param_shapes(one)
    strip = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)
    pb, pe = strip(shapes["backbone"]["blocks"]), strip(shapes["expert"]["blocks"])
    video = tok(grid[0] * grid[1] * grid[2])

    def joint(pb, pe, state, e, ctx):
        rope = wan.rope_tables(*wan.rope_positions(f, grid), cfg.head_dim)
        rope_r = wan.rope_tables(*wan.rope_positions(f, grid, reference=True), cfg.head_dim)
        return wan._joint_layer(cfg, pb, pe, state, (e, rope, ctx), (e, rope_r, ctx))

    def plain(pb, x, e, ctx):
        rope = wan.rope_tables(*wan.rope_positions(f, grid), cfg.head_dim)
        return wan.Block(cfg, parent=None).apply({"params": pb}, x, e, rope, ctx)

    j = jax.jit(joint).lower(pb, pe, (video, video), temb_proj, context).cost_analysis()["flops"]
    p = jax.jit(plain).lower(pb, video, temb_proj, context).cost_analysis()["flops"]
    return j, p


def wan_report(experts: str, **sizes) -> dict:
    cfg = wan.WanConfig(expert_layers=wan.EXPERT_PRESETS[experts], dtype="bfloat16", param_dtype="bfloat16")
    lowered = lower_wan_forward(cfg, **sizes).cost_analysis()["flops"]
    layer = dict(zip((True, False), wan_layer_flops(cfg, **{k: v for k, v in sizes.items() if k != "refs"})))
    repeats, runs = wan.layer_plan(cfg.num_layers, cfg.expert_layers if sizes.get("refs", 1) else ())
    # cost_analysis counts every lax.scan body once: add the remaining trips of each layer body.
    xla = lowered + sum((repeats * (stop - start) - 1) * layer[j] for start, stop, j in runs)
    return {"xla": xla, "analytic": wan_analytic_flops(cfg, **sizes), "joint_layer": layer[True],
            "plain_layer": layer[False]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["cogvideox", "wan"], default="cogvideox")
    ap.add_argument("--experts", choices=sorted(wan.EXPERT_PRESETS), default="d10", help="Wan expert layers")
    for name, default in (("batch", 2), ("frames", 49), ("height", 480), ("width", None), ("refs", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    args = vars(ap.parse_args())
    model, experts = args.pop("model"), args.pop("experts")
    sizes = {**args, "width": args["width"] or (832 if model == "wan" else 720)}
    if model == "wan":
        r = wan_report(experts, **sizes)
        print(f"sizes {sizes}, Wan2.1-I2V-14B + VAP experts {experts}")
        print(f"XLA cost_analysis (scan trips added): {r['xla'] / 1e15:7.3f} PFLOP   [one joint layer "
              f"{r['joint_layer'] / 1e12:.1f} TFLOP, one plain layer {r['plain_layer'] / 1e12:.1f} TFLOP]")
        print(f"analytic matmul FLOPs               : {r['analytic'] / 1e15:7.3f} PFLOP   "
              f"(ratio XLA/analytic {r['xla'] / r['analytic']:.3f})")
        return
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
