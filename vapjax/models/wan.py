"""Wan2.1-I2V diffusion transformer with the Video-As-Prompt expert (Mixture-of-Transformers).

Two parameter partitions:
  * `backbone` — the stock Wan2.1-I2V-14B weights (frozen in VAP training); processes the noisy
    target video, cross-attending to its caption and to the CLIP embedding of its first frame.
  * `expert`   — the parallel reference stream (every `*_mot_ref` weight of the official model):
    its own patch embedding, its own time/text/image embedders and, on the layers listed in
    `expert_layers`, its own blocks. It processes the clean reference video with the reference
    caption and the CLIP embedding of the reference's first frame, modulated by a fixed "clean"
    reference timestep (1 in the official pipeline and trainer).
The streams meet only in self-attention: in an expert layer the queries, keys and values of both are
concatenated — [target video ; reference video], no text — and attend jointly. Cross-attention stays
per stream. In a layer without an expert the reference passes through unchanged. The reference gets
a 3D RoPE shifted back in time (positions −F … −1, spatial positions unchanged).

Layout: latents are channels-last, [B, F, H, W, C] (the official code uses [B, C, F, H, W]).
Spec: ../shared/spec/vap.md §3.2, §6, §8 (pointers WAN:… refer to the official repository).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vapjax import lora, offload, quantize
from vapjax.models.cogvideox import TOKENS, attention, layer_runs, timestep_features
from vapjax.sharding import constrain

Array = jax.Array

# The three expert-layer lists the official repository ships (examples/training/sft/wan/vap_mot/config_ori*.json).
EXPERT_PRESETS = {
    "all": tuple(range(40)),            # config_ori.json
    "d20": tuple(range(0, 40, 2)),      # config_ori_d_20.json (single-node training script)
    "d10": tuple(range(0, 40, 4)),      # config_ori_d_10.json (multi-node script; most likely the released model)
}
TEXT_TOKENS = 512     # UMT5 caption length; the official cross-attention hard-codes it (WAN:50, 127)
IMAGE_TOKENS = 257    # CLIP ViT-H/14 penultimate hidden states of one frame

# Every field of the official (MoT) and the stock diffusers config; anything else is refused.
_KNOWN = {
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
    "rope_max_seq_len", "pos_embed_seq_len", "block_idx_with_mot_ref", "attention_head_dim_mot_ref",
    "supported_effect_types", "num_ref_embeddings", "reference_train_mode",
}
# Fields that select features Wan2.1-I2V/VAP does not use; we refuse them rather than compute something else.
_UNSUPPORTED = {
    "pos_embed_seq_len": None, "attention_head_dim_mot_ref": None, "supported_effect_types": None,
    "num_ref_embeddings": None, "reference_train_mode": None, "qk_norm": "rms_norm_across_heads",
    "cross_attn_norm": True,
}


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Architecture (defaults: Wan2.1-I2V-14B + VAP, experts on every 4th layer) and run options."""
    num_heads: int = 40
    head_dim: int = 128
    in_channels: int = 36            # [noisy latents 16 | first-frame mask 4 | condition latents 16]
    out_channels: int = 16
    text_dim: int = 4096
    image_dim: int | None = 1280     # CLIP width (image-to-video); None: text-to-video, no image branch
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    expert_layers: tuple[int, ...] = EXPERT_PRESETS["d10"]
    # Run options (not architecture).
    dtype: str = "float32"           # compute dtype; fp32 islands as the official bf16 inference (spec §8.13)
    param_dtype: str = "float32"     # storage dtype, except the islands, which stay float32
    attention: str | None = None     # jax.nn.dot_product_attention implementation: None | "xla" | "cudnn"
    remat: str = "none"              # per-layer rematerialisation: "none" | "full" | "dots"
    stream_layers: bool = False      # layers arrive from host memory (offload="layers", vapjax.offload)
    quantize: str = ""               # "int8": the backbone's layer kernels stored as int8 (vapjax.quantize)

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    def with_options(self, **kw) -> "WanConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_diffusers(cls, d: dict, **options) -> "WanConfig":
        """From an official (WanTransformer3DMOTModel) or stock (WanTransformer3DModel) config.json."""
        unknown = sorted(k for k in d if not k.startswith("_") and k not in _KNOWN)
        if unknown:
            raise ValueError(f"Wan config fields {unknown} are unknown to this port")
        for key, ok in _UNSUPPORTED.items():
            if d.get(key, ok) != ok:
                raise ValueError(f"Wan config field {key}={d[key]!r} is not supported (only {ok!r})")
        dim = d["num_attention_heads"] * d["attention_head_dim"]
        image_dim = d.get("image_dim")
        if d.get("added_kv_proj_dim") != (dim if image_dim else None):
            raise ValueError(f"Wan config added_kv_proj_dim={d.get('added_kv_proj_dim')!r} with "
                             f"image_dim={image_dim!r}: expected {dim if image_dim else None} "
                             f"(the image keys/values project the embedded image)")
        return cls(
            num_heads=d["num_attention_heads"], head_dim=d["attention_head_dim"],
            in_channels=d["in_channels"], out_channels=d.get("out_channels") or d["in_channels"],
            text_dim=d["text_dim"], image_dim=image_dim, freq_dim=d["freq_dim"], ffn_dim=d["ffn_dim"],
            num_layers=d["num_layers"], patch_size=tuple(d["patch_size"]), eps=d["eps"],
            rope_max_seq_len=d["rope_max_seq_len"],
            # A stock (non-MoT) config has no experts.
            expert_layers=tuple(sorted(d.get("block_idx_with_mot_ref", ()))),
            **options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        return cls(**d)

    def __post_init__(self):
        # Expert slots are filled in layer order (the layer plan and the converter assume ascending).
        object.__setattr__(self, "expert_layers", tuple(sorted(int(i) for i in self.expert_layers)))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)
        bad = [i for i in self.expert_layers if not 0 <= i < self.num_layers]
        if bad or len(set(self.expert_layers)) != len(self.expert_layers):
            raise ValueError(f"expert_layers {self.expert_layers} must be distinct layers in [0, {self.num_layers})")
        if self.expert_layers and not self.image_dim:
            raise ValueError("the official Wan expert cross-attends to a CLIP image embedding: it needs image_dim")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size {self.patch_size}: expected (p_t, p_h, p_w)")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat={self.remat!r}: expected 'none', 'full' or 'dots'")


# ----------------------------------------------------------------------------------------------
# 3D RoPE (WAN:368-464). Complex pairs (x₂ⱼ, x₂ⱼ₊₁) of each head vector; the pairs are split
# [t | h | w] = 22 | 21 | 21 for head_dim 128. Angles and their cos/sin in float64 on the host, as
# the reference does (torch.polar in float64); the rotation itself in float32. The tables stay
# per axis (a few KB, host constants); they are broadcast over the token grid inside the rotation,
# so no [tokens, 64] table is ever materialised or constant-folded.
# ----------------------------------------------------------------------------------------------

def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real dimensions of the t, h, w parts of a head vector: h = w = 2·⌊D/6⌋, t = the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_positions(frames: int, grid: tuple[int, int, int], reference: bool = False):
    """(t, h, w) integer positions of one stream's tokens. `frames` is the stream's latent frame
    count, `grid` its patch grid. The reference's temporal positions start at −frames (WAN:437),
    so a single reference occupies −F … −1, just before the target's 0 … F−1."""
    f, h, w = grid
    t = np.arange(f) - (frames if reference else 0)
    return t, np.arange(h), np.arange(w)


def rope_tables(t, h, w, head_dim: int, theta: float = 10000.0):
    """Per axis (cos, sin) [positions, pairs of that axis], float32 numpy: ((t), (h), (w))."""
    tables = []
    for pos, dim in zip((t, h, w), rope_split(head_dim)):
        omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)
        ang = np.outer(np.asarray(pos, np.float64), omega)
        tables.append((np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)))
    return tuple(tables)


def apply_rope(x: Array, rope) -> Array:
    """Rotate each pair (x₂ⱼ, x₂ⱼ₊₁) of x [B, S, N, D], as the complex number x₂ⱼ + i·x₂ⱼ₊₁, by e^{iθ};
    tokens ordered (t, h, w) on the grid of the `rope_tables`."""
    T, H, W = (len(cos) for cos, _ in rope)
    b, _, n, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, T, H, W, n, d // 2, 2)
    out, start = [], 0
    for axis, (cos, sin) in enumerate(rope):
        shape = [1, 1, 1, 1, cos.shape[-1]]          # (t, h, w, head, pair), broadcast over the other axes
        shape[axis] = len(cos)
        c, s = cos.reshape(shape), sin.reshape(shape)
        p = pairs[..., start:start + cos.shape[-1], :]
        start += cos.shape[-1]
        out.append(jnp.stack([p[..., 0] * c - p[..., 1] * s, p[..., 0] * s + p[..., 1] * c], axis=-1))
    return jnp.concatenate(out, axis=-2).reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Layers. Precision follows the official bf16 inference (spec §8.13): `_keep_in_fp32_modules`
# keeps time_embedder, scale_shift_table and norm1/2/3 (also the image embedder's norm1/norm2) in
# float32 — matched by exact module name, so the expert's `scale_shift_table_mot_ref` and
# `norm2_mot_ref` stay in the storage dtype. LayerNorm statistics, modulation and gating are float32;
# the residual stream is stored in the compute dtype.
# ----------------------------------------------------------------------------------------------

def _dt(cfg: WanConfig):
    return jnp.dtype(cfg.dtype)


def _pdt(cfg: WanConfig):
    return jnp.dtype(cfg.param_dtype)


def _dense(cfg: WanConfig, features: int, name: str, fp32: bool = False) -> lora.Dense:
    dt, pdt = (jnp.float32, jnp.float32) if fp32 else (_dt(cfg), _pdt(cfg))
    return lora.Dense(features, dtype=dt, param_dtype=pdt, name=name)


def layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm without affine, float32 in and out."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)


class FP32LayerNorm(nn.Module):
    """Affine LayerNorm computed in float32 (float32 output; the caller casts)."""
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        return layer_norm(x, self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class RMSNorm(nn.Module):
    """RMSNorm over the whole last axis (all heads at once): statistics in float32, the weight
    applied in the compute dtype (diffusers RMSNorm with a bf16 weight)."""
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def _table_init(dim: int):
    """Modulation tables start as N(0, 1/dim), as the official `torch.randn(...) / dim**0.5`."""
    return lambda rng, shape, dtype: (jax.random.normal(rng, shape) / math.sqrt(dim)).astype(dtype)


def _rms(cfg: WanConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.eps, _dt(cfg), _pdt(cfg), name=name)


def _heads(cfg: WanConfig, x: Array) -> Array:
    return x.reshape(*x.shape[:-1], cfg.num_heads, cfg.head_dim)


class SelfAttention(nn.Module):
    """Q/K/V with RMSNorm over the full width of q and k *before* the head split (eps 1e-6), RoPE
    after it; split from the output projection so that an expert layer can attend jointly."""
    cfg: WanConfig

    def setup(self):
        c = self.cfg
        self.to_q, self.to_k, self.to_v, self.to_out = (_dense(c, c.dim, n) for n in ("to_q", "to_k", "to_v", "to_out"))
        self.norm_q, self.norm_k = _rms(c, "norm_q"), _rms(c, "norm_k")

    def qkv(self, x: Array, rope):
        c = self.cfg
        q, k, v = _heads(c, self.norm_q(self.to_q(x))), _heads(c, self.norm_k(self.to_k(x))), _heads(c, self.to_v(x))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def out(self, o: Array) -> Array:
        return self.to_out(o.reshape(*o.shape[:-2], -1))


class CrossAttention(nn.Module):
    """Cross-attention to a stream's own context: the caption through to_k/to_v and, for I2V, the
    CLIP image tokens through their own add_k_proj/add_v_proj — two attentions with the same
    queries, summed before the output projection (WAN:110-190)."""
    cfg: WanConfig

    @nn.compact
    def __call__(self, x: Array, text: Array, image: Array | None) -> Array:
        c = self.cfg
        q = _heads(c, _rms(c, "norm_q")(_dense(c, c.dim, "to_q")(x)))
        k = _heads(c, _rms(c, "norm_k")(_dense(c, c.dim, "to_k")(text)))
        o = attention(q, k, _heads(c, _dense(c, c.dim, "to_v")(text)), c.attention)
        if c.image_dim:
            k_img = _heads(c, _rms(c, "norm_added_k")(_dense(c, c.dim, "add_k_proj")(image)))
            o = o + attention(q, k_img, _heads(c, _dense(c, c.dim, "add_v_proj")(image)), c.attention)
        return _dense(c, c.dim, "to_out")(o.reshape(*o.shape[:-2], -1))


class FeedForward(nn.Module):
    cfg: WanConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.gelu(_dense(self.cfg, self.cfg.ffn_dim, "proj_in")(x), approximate=True)
        return _dense(self.cfg, self.cfg.dim, "proj_out")(h)


class Block(nn.Module):
    """One stream's half of a Wan layer (WAN:580-697). Split around self-attention so that an expert
    layer can join the two streams' Q/K/V; `__call__` is the stock single-stream layer.
    `expert`: the expert's modulation table and cross-attention norm are not fp32 islands."""
    cfg: WanConfig
    expert: bool = False

    def setup(self):
        c = self.cfg
        island = _pdt(c) if self.expert else jnp.float32
        self.scale_shift_table = self.param("scale_shift_table", _table_init(c.dim), (6, c.dim), island)
        self.attn1 = SelfAttention(c)
        self.attn2 = CrossAttention(c)
        self.norm2 = FP32LayerNorm(c.eps, island)
        self.ffn = FeedForward(c)

    def modulation(self, temb_proj: Array) -> list[Array]:
        """(shift, scale, gate, ffn shift, ffn scale, ffn gate), each [B, 1, D] float32."""
        mod = self.scale_shift_table.astype(jnp.float32) + temb_proj.astype(jnp.float32).reshape(-1, 6, self.cfg.dim)
        return [mod[:, i:i + 1] for i in range(6)]

    def qkv(self, x: Array, temb_proj: Array, rope):
        mod = self.modulation(temb_proj)
        shift, scale = mod[0], mod[1]
        h = (layer_norm(x, self.cfg.eps) * (1 + scale) + shift).astype(x.dtype)
        return self.attn1.qkv(h, rope), mod

    def finish(self, x: Array, o: Array, mod: list[Array], context) -> Array:
        dt, eps = x.dtype, self.cfg.eps
        _, _, gate, c_shift, c_scale, c_gate = mod
        x = (x.astype(jnp.float32) + self.attn1.out(o).astype(jnp.float32) * gate).astype(dt)
        x = x + self.attn2(self.norm2(x).astype(dt), *context)       # no gate on cross-attention
        h = (layer_norm(x, eps) * (1 + c_scale) + c_shift).astype(dt)
        return (x.astype(jnp.float32) + self.ffn(h).astype(jnp.float32) * c_gate).astype(dt)

    def __call__(self, x, temb_proj, rope, context):
        qkv, mod = self.qkv(x, temb_proj, rope)
        return self.finish(x, attention(*qkv, self.cfg.attention), mod, context)


class TimeEmbedder(nn.Module):
    """Sinusoidal features (cos first) → Linear → SiLU → Linear, all float32 (an fp32 island)."""
    cfg: WanConfig

    @nn.compact
    def __call__(self, t: Array) -> Array:
        c = self.cfg
        x = timestep_features(t, c.freq_dim, flip_sin_to_cos=True, freq_shift=0)
        return _dense(c, c.dim, "linear_2", fp32=True)(nn.silu(_dense(c, c.dim, "linear_1", fp32=True)(x)))


class TextEmbedder(nn.Module):
    """Caption projection: Linear → GELU(tanh) → Linear."""
    cfg: WanConfig

    @nn.compact
    def __call__(self, text: Array) -> Array:
        h = nn.gelu(_dense(self.cfg, self.cfg.dim, "linear_1")(text), approximate=True)
        return _dense(self.cfg, self.cfg.dim, "linear_2")(h)


class ImageEmbedder(nn.Module):
    """CLIP-image projection: FP32 LayerNorm → Linear → GELU (exact) → Linear → FP32 LayerNorm."""
    cfg: WanConfig

    @nn.compact
    def __call__(self, image: Array) -> Array:
        c = self.cfg
        dt = _dt(c)
        h = FP32LayerNorm(1e-5, name="norm1")(image).astype(dt)          # nn.LayerNorm's default eps
        h = _dense(c, c.dim, "proj_out")(nn.gelu(_dense(c, c.image_dim, "proj_in")(h), approximate=False))
        return FP32LayerNorm(1e-5, name="norm2")(h).astype(dt)


class ConditionEmbedder(nn.Module):
    """One stream's timestep, caption and image embeddings (WAN:271-365). Returns temb [B, D]
    (for the output head), its projection to the 6 modulation vectors [B, 6·D], and the context."""
    cfg: WanConfig

    @nn.compact
    def __call__(self, t: Array, text: Array, image: Array | None):
        c = self.cfg
        temb = TimeEmbedder(c, name="time_embedder")(t).astype(_dt(c))
        temb_proj = _dense(c, 6 * c.dim, "time_proj")(nn.silu(temb))
        text = TextEmbedder(c, name="text_embedder")(text.astype(_dt(c)))
        image = ImageEmbedder(c, name="image_embedder")(image.astype(_dt(c))) if c.image_dim else None
        return temb, temb_proj, (text, image)


class OutputHead(nn.Module):
    """Modulated FP32 LayerNorm (shift, scale from a table plus temb — not the 6-vector projection)
    and the projection to p_t·p_h·p_w·C values per token (WAN:952-962)."""
    cfg: WanConfig

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        c = self.cfg
        table = self.param("scale_shift_table", _table_init(c.dim), (2, c.dim), jnp.float32)
        mod = table.astype(jnp.float32)[None] + temb.astype(jnp.float32)[:, None]
        h = (layer_norm(x, c.eps) * (1 + mod[:, 1:2]) + mod[:, 0:1]).astype(x.dtype)
        return _dense(c, math.prod(c.patch_size) * c.out_channels, "proj_out")(h)


def patchify(latents: Array, patch: tuple[int, int, int]) -> Array:
    """[B, F, H, W, C] -> tokens [B, F'·H'·W', C·p_t·p_h·p_w], tokens ordered (f, h, w) and each
    patch flattened (C, p_t, p_h, p_w) like the official Conv3d weight."""
    b, f, h, w, ch = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, ch).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), ch * pt * ph * pw)


def unpatchify(tokens: Array, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int) -> Array:
    """Tokens [B, F'·H'·W', p_t·p_h·p_w·C] -> [B, F, H, W, C]; the channel is the *last* factor of
    each token's vector (WAN:964-968)."""
    (f, h, w), (pt, ph, pw) = grid, patch
    x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(tokens.shape[0], f * pt, h * ph, w * pw, channels)


class Stream(nn.Module):
    """One stream's parameters: patch embedding, condition embedder, a stack of `num_blocks` blocks
    (leading axis = layer) and, for the backbone, the output head."""
    cfg: WanConfig
    num_blocks: int
    expert: bool

    def setup(self):
        c = self.cfg
        self.patch_embedding = _dense(c, c.dim, "patch_embedding")
        self.condition_embedder = ConditionEmbedder(c)
        self.blocks = lora.stacked_param(self, "blocks", self._init_blocks)  # LoRA factors may sit beside kernels
        if not self.expert:
            self.head = OutputHead(c)

    def _init_blocks(self, rng):
        c = self.cfg
        x = jnp.zeros((1, 1, c.dim))
        context = (x, x if c.image_dim else None)
        temb_proj = jnp.zeros((1, 6 * c.dim))
        init = lambda r: Block(c, self.expert, parent=None).init(r, x, temb_proj, None, context)["params"]
        blocks = jax.vmap(init)(jax.random.split(rng, self.num_blocks))
        # The frozen backbone's kernels as stored (vapjax.quantize: int8 or as they are).
        return blocks if self.expert else quantize.quantize_stack(blocks, c.quantize)

    def embed(self, latents, text, image, t):
        """(video tokens, temb, modulation projection, (text, image) context)."""
        video = self.patch_embedding(patchify(latents.astype(_dt(self.cfg)), self.cfg.patch_size))
        return (video, *self.condition_embedder(t, text, image))

    def __call__(self, latents, text, image, t):  # for init only
        video, temb, _, _ = self.embed(latents, text, image, t)
        return video if self.expert else self.head(video, temb)


def layer_plan(num_layers: int, expert_layers: Sequence[int]) -> tuple[int, list[tuple[int, int, bool]]]:
    """(repeats, runs): the layer stack as `repeats` copies of one period, the period split into
    maximal runs [start, stop) of layers that all have, or all lack, an expert. d10 is 10 × [E, -, -, -],
    d20 is 20 × [E, -], 'all' is 40 × [E]; a list with no period is one period (e.g. [0, 2] of 3).
    One lax.scan runs over the repeats, so d10 compiles one expert and one plain layer body, not 20."""
    has = [i in set(expert_layers) for i in range(num_layers)]
    period = next(p for p in range(1, num_layers + 1)
                  if num_layers % p == 0 and all(has[i] == has[i % p] for i in range(num_layers)))
    return num_layers // period, layer_runs(period, [i for i in expert_layers if i < period])


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class WanTransformer(nn.Module):
    """Backbone + expert. `__call__` returns the backbone's flow prediction for the target,
    [B, F, H, W, out_channels].

    latents          [B, F, H, W, in_channels]  noisy latents ⊕ first-frame mask ⊕ condition latents
    text             [B, S, text_dim]           target caption embeddings (UMT5, 512 tokens)
    image_embeds     [B, 257, image_dim]        CLIP embedding of the target's first frame (None for T2V)
    t                [B] or scalar              diffusion timestep
    ref_latents      [B, F_ref, H, W, in_channels]  one clean reference, same channel layout (None: plain Wan)
    ref_text         [B, S, text_dim]           reference caption embeddings
    ref_image_embeds [B, 257, image_dim]        CLIP embedding of the reference's first frame
    ref_t            scalar or [B]              the expert's timestep (1 in the official pipeline and trainer)
    """
    cfg: WanConfig

    def setup(self):
        c = self.cfg
        self.backbone = Stream(c, c.num_layers, expert=False, name="backbone")
        if c.expert_layers:
            self.expert = Stream(c, len(c.expert_layers), expert=True, name="expert")

    def __call__(self, latents: Array, text: Array, image_embeds: Array | None, t: Array,
                 ref_latents: Array | None = None, ref_text: Array | None = None,
                 ref_image_embeds: Array | None = None, ref_t: Array | float = 1) -> Array:
        c = self.cfg
        b = latents.shape[0]
        grid = self._grid(latents, "latents")
        if c.image_dim and image_embeds is None:
            raise ValueError("this is an image-to-video model: it needs image_embeds (CLIP of the first frame)")
        video, temb, temb_proj, context = self.backbone.embed(latents, text, image_embeds,
                                                              jnp.broadcast_to(jnp.asarray(t), (b,)))
        cond = (temb_proj, rope_tables(*rope_positions(latents.shape[1], grid), c.head_dim), context)

        use_ref = ref_latents is not None
        state = (video,)
        if use_ref:
            ref_video, cond_ref = self._embed_ref(ref_latents, ref_text, ref_image_embeds, ref_t, text, image_embeds)
            state = (video, ref_video)

        repeats, runs = layer_plan(c.num_layers, c.expert_layers if use_ref else ())
        period = c.num_layers // repeats
        n_expert = sum(stop - start for start, stop, joint in runs if joint)
        per_repeat = lambda tree, n: jax.tree.map(lambda a: a.reshape(repeats, n, *a.shape[1:]), tree)
        params = None if c.stream_layers else (per_repeat(self.backbone.blocks, period),
                                                per_repeat(self.expert.blocks, n_expert) if n_expert else None)

        def plain(s, p):  # the reference stream, if any, passes through unchanged
            s = tuple(constrain(x, TOKENS) for x in s)
            return (Block(c, parent=None).apply({"params": p}, s[0], *cond),) + s[1:]

        def joint(s, p):
            return _joint_layer(c, p[0], p[1], s, cond, cond_ref)

        plain, joint = self._remat(plain), self._remat(joint)

        def one_period(s, p):
            pb, pe = p
            offset = 0
            for start, stop, is_joint in runs:
                n = stop - start
                if is_joint:
                    layer, ps = joint, (_take(pb, start, stop), _take(pe, offset, offset + n))
                    offset += n
                else:
                    layer, ps = plain, _take(pb, start, stop)
                if n == 1:
                    s = layer(s, jax.tree.map(lambda a: a[0], ps))
                else:
                    s, _ = jax.lax.scan(lambda s_, p_: (layer(s_, p_), None), s, ps)
            return s, None

        def one_period_streamed(s, r):
            """The same period from the host-resident stacks: each run's loop takes its layers by index
            (layer r·period + start + i) out of the whole stack (vapjax.offload.scan_layers)."""
            offset = 0
            for start, stop, is_joint in runs:
                n = stop - start
                if is_joint:
                    layer, stacks, firsts = joint, (self.backbone.blocks, self.expert.blocks), (
                        r * period + start, r * n_expert + offset)
                    offset += n
                else:
                    layer, stacks, firsts = (lambda s_, p_: plain(s_, p_[0])), (self.backbone.blocks,), (
                        r * period + start,)
                if n == 1:  # no loop, as in the resident period (so that the two equal bit for bit)
                    s = layer(s, tuple(offload.take(t, f) for t, f in zip(stacks, firsts)))
                else:
                    s, _ = offload.scan_layers(lambda s_, p_: (layer(s_, p_), None), s, stacks, firsts, n,
                                               stream=True)
            return s, None

        if c.stream_layers:
            state, _ = (one_period_streamed(state, 0) if repeats == 1 else
                        jax.lax.scan(one_period_streamed, state, jnp.arange(repeats)))
        elif repeats == 1:
            state, _ = one_period(state, jax.tree.map(lambda a: a[0], params))
        else:
            state, _ = jax.lax.scan(one_period, state, params)

        out = self.backbone.head(state[0], temb)
        return unpatchify(out, grid, c.patch_size, c.out_channels)

    def init_all(self, latents, text, image, t):
        """Creates every parameter without running the layer stack (cheap `init`)."""
        out = self.backbone(latents, text, image, t)
        if self.cfg.expert_layers:
            self.expert(latents, text, image, t)
        return out

    def _grid(self, latents: Array, what: str) -> tuple[int, int, int]:
        c = self.cfg
        if latents.ndim != 5 or latents.shape[-1] != c.in_channels:
            raise ValueError(f"{what} {tuple(latents.shape)}: expected [B, F, H, W, {c.in_channels}] (channels last)")
        grid = tuple(n // p for n, p in zip(latents.shape[1:4], c.patch_size))
        if any(n % p for n, p in zip(latents.shape[1:4], c.patch_size)) or max(grid) > c.rope_max_seq_len:
            raise ValueError(f"{what} {tuple(latents.shape)}: F, H, W must be multiples of the patch {c.patch_size} "
                             f"with at most {c.rope_max_seq_len} patches per axis")
        return grid

    def _embed_ref(self, ref_latents, ref_text, ref_image, ref_t, text, image):
        """The expert's embeddings of the one reference, its modulation (from `ref_t`) and RoPE."""
        c = self.cfg
        if not c.expert_layers:
            raise ValueError("this checkpoint has no expert: it cannot take a reference video")
        if ref_text is None or ref_image is None:
            raise ValueError("a reference video needs its caption embeddings (ref_text) and the CLIP embedding "
                             "of its first frame (ref_image_embeds)")
        b = text.shape[0]
        grid = self._grid(ref_latents, "ref_latents")
        if (ref_latents.shape[0], ref_text.shape[0], ref_image.shape[0]) != (b, b, b):
            raise ValueError(f"reference batch ({ref_latents.shape[0]}, {ref_text.shape[0]}, {ref_image.shape[0]}) "
                             f"differs from the target batch {b}")
        if ref_text.shape[1] != text.shape[1] or ref_image.shape[1] != image.shape[1]:
            raise ValueError(f"Wan-VAP takes exactly one reference (the official model asserts num_mot_ref == 1): "
                             f"ref_text has {ref_text.shape[1]} tokens and ref_image_embeds {ref_image.shape[1]}, "
                             f"for one caption of {text.shape[1]} and one image of {image.shape[1]}")
        video, _, temb_proj, context = self.expert.embed(ref_latents, ref_text, ref_image,
                                                         jnp.broadcast_to(jnp.asarray(ref_t), (b,)))
        rope = rope_tables(*rope_positions(ref_latents.shape[1], grid, reference=True), c.head_dim)
        return video, (temb_proj, rope, context)

    def _remat(self, body):
        """A scanned layer body as the run options ask: its layer streamed in from host memory and its
        int8 kernels dequantised (vapjax.offload.layer_body), and rematerialised."""
        body = offload.layer_body(body, stream=self.cfg.stream_layers, dtype=self.cfg.param_dtype)
        if self.cfg.remat == "none":
            return body
        return jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat])


def _take(tree, start: int, stop: int):
    return jax.tree.map(lambda a: a[start:stop], tree)


def _joint_layer(cfg: WanConfig, p_backbone, p_expert, state, cond, cond_ref):
    """An expert layer: each stream modulates and projects with its own weights, one joint
    self-attention over [target video ; reference video], then each stream's own output projection,
    gated residual, cross-attention to its own context and FFN (WAN:603-697)."""
    video, ref = (constrain(s, TOKENS) for s in state)
    temb_proj, rope, context = cond
    temb_proj_r, rope_r, context_r = cond_ref
    backbone, expert = Block(cfg, parent=None), Block(cfg, expert=True, parent=None)
    (q, k, v), mod = backbone.apply({"params": p_backbone}, video, temb_proj, rope, method=Block.qkv)
    (qr, kr, vr), mod_r = expert.apply({"params": p_expert}, ref, temb_proj_r, rope_r, method=Block.qkv)
    o = attention(jnp.concatenate([q, qr], 1), jnp.concatenate([k, kr], 1), jnp.concatenate([v, vr], 1),
                  cfg.attention)
    n = q.shape[1]
    video = backbone.apply({"params": p_backbone}, video, o[:, :n], mod, context, method=Block.finish)
    ref = expert.apply({"params": p_expert}, ref, o[:, n:], mod_r, context_r, method=Block.finish)
    return video, ref


def dummy_inputs(cfg: WanConfig, batch: int = 1, frames: int = 13, height: int = 60, width: int = 104,
                 text_len: int = TEXT_TOKENS, image_len: int = IMAGE_TOKENS, with_ref: bool = True,
                 dtype=jnp.float32):
    """Shape-correct zeros; defaults: 49 frames at 480×832 (13 latent frames of 60×104), one reference."""
    lat = jnp.zeros((batch, frames, height, width, cfg.in_channels), dtype)
    txt = jnp.zeros((batch, text_len, cfg.text_dim), dtype)
    img = jnp.zeros((batch, image_len, cfg.image_dim), dtype) if cfg.image_dim else None
    t = jnp.zeros((batch,), jnp.float32)
    if not (cfg.expert_layers and with_ref):
        return lat, txt, img, t
    return lat, txt, img, t, lat, txt, img


def init_params(cfg: WanConfig, rng: Array) -> dict:
    """Random parameters {'backbone': …, 'expert': …} (no 'expert' without expert layers)."""
    model = WanTransformer(cfg)
    pt, ph, pw = cfg.patch_size
    inputs = dummy_inputs(cfg, frames=pt, height=ph, width=pw, text_len=1, image_len=1, with_ref=False)
    return jax.jit(lambda r: model.init(r, *inputs, method=model.init_all)["params"])(rng)


def param_shapes(cfg: WanConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
