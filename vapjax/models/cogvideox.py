"""CogVideoX-I2V diffusion transformer with the Video-As-Prompt expert (Mixture-of-Transformers).

Two parameter partitions with the same block architecture:
  * `backbone` — the stock CogVideoX weights (frozen in VAP training), processes the target:
    its caption tokens and its noisy video tokens.
  * `expert`   — the parallel reference stream (every `*_mot_ref` weight of the official model),
    processes the reference video(s) and caption(s) on the layers listed in `expert_layers`.
The streams meet only inside attention: in an expert layer the queries, keys and values of both are
concatenated — token order [target text, target video, reference text, reference video] — and attend
jointly. In a layer without an expert the reference stream passes through unchanged. The reference
video gets a 3D RoPE shifted back in time (positions −N·T … −1, spatial positions unchanged).

The paper's ablations are config switches (`structure`, `ref_rope`, `expert_layers` presets, and the
reference's own timestep `ref_t`), each one small code path: see `STRUCTURES` and `REF_ROPES`.

Layout: latents are channels-last, [B, F, H, W, C] (the official code uses [B, F, C, H, W]).
Spec: ../shared/spec/vap.md §1–3 (pointers COG:…, EMB:… refer to the official repository).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vapjax import attention as attention_paths
from vapjax import lora, offload, quantize
from vapjax.attention import IMPLEMENTATIONS
from vapjax.numerics import torch_linspace
from vapjax.sharding import constrain

Array = jax.Array
# Logical axes of the activations (vocabulary: vapjax.sharding.RULES); constraints are no-ops unless a
# sharding context is active, and make splitting heads (tensor) or the joint sequence expressible.
TOKENS = ("activation_batch", "activation_length", "activation_embed")                         # [B, S, D]
HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")   # [B, S, N, Dh]

# Fields of the official config.json that select features the shipped VAP/CogVideoX-1.0 models do
# not use; we refuse them rather than silently compute something else.
_UNSUPPORTED = {
    "patch_size_t": None, "ofs_embed_dim": None, "attention_head_dim_mot_ref": None,
    "supported_effect_types": None, "num_ref_embeddings": None, "reference_train_mode": None,
    "activation_fn": "gelu-approximate", "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True, "attention_bias": True, "patch_bias": True, "dropout": 0.0,
}

# How the reference enters the model (paper Tab. 2; official flags in config.json, spec §2.3):
#   mot                        the VAP expert: one joint attention over both streams (the shipped model)
#   unidirectional_cross_attn  A3, official `ablation_single_encoder` (COG:205-291): the expert runs on the
#                              reference alone, then the frozen block attends over target ⊕ reference and
#                              keeps the target's rows; the reference never sees the target
#   residual_addition          A4, official `ablation_residual_addition` (COG:293-373): the expert runs on
#                              the reference alone, the frozen block as usual, then the expert's hidden
#                              states are added to the target's (text to text, video to video)
#   single_branch              A1, no expert: the reference's video tokens (not its caption, as the official
#                              code) join the backbone's own sequence, the whole backbone is finetuned
#   single_branch_lora         A1 with the backbone frozen and LoRA (`lora_rank`) on its attention q, k, v, out
STRUCTURES = ("mot", "unidirectional_cross_attn", "residual_addition", "single_branch", "single_branch_lora")
SINGLE_BRANCH = ("single_branch", "single_branch_lora")
# The reference's RoPE positions (paper Tab. 7):
#   shifted     t = −N·T … −1 (the shipped model, official `continous_negative`), h and w as the target's
#   identical   the target's positions, repeated for each reference (t = 0 … T−1)
#   shifted_tw  shifted in time as `shifted`, and in width by one target width (w − W): the reference sits
#               to the left of the target as well as before it. The official code has no such mode (spec §3
#               lists only `continous_negative` and `discrete_long_reference`); this is our reading of
#               "shift in T and W": the same adjacent, non-overlapping shift on the second axis.
REF_ROPES = ("shifted", "identical", "shifted_tw")
# The LoRA's projections in a backbone block (PEFT target_modules `to_q|to_k|to_v|to_out.0`, official
# 1-single_branch_lora.sh) and its scale α/r = 1 (the script's rank 64, α 64).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")
EXPERT_LAYER_PRESETS = ("all", "odd", "first_half", "first_last", "odd_first_half")


def expert_layer_preset(spec: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Expert layers by preset name, or an explicit sequence (returned sorted).

    The presets reproduce the official lists for CogVideoX-5B's 42 layers (examples/training/sft/
    cogvideox/vap_mot/config_ori.json and ablation/config_ori_*.json), where the last layer never has an
    expert; with L = num_layers − 1 (41 there):
      all             0 … L−1                     (0–40, config_ori)
      odd             0, 2, … below L             (0, 2, …, 40, "distributed_all": odd counted from 1)
      first_half      0 … L//2 − 1                (0–19, "first_half")
      first_last      0 and L−1                   ((0, 40), "first_last")
      odd_first_half  0, 2, …, L//2               (0, 2, …, 20, "distributed_first_half")"""
    if not isinstance(spec, str):
        return tuple(sorted(int(i) for i in spec))
    last = num_layers - 1
    presets = {"all": range(last), "odd": range(0, last, 2), "first_half": range(last // 2),
               "first_last": sorted({0, last - 1}) if last > 0 else (),
               "odd_first_half": range(0, last // 2 + 1, 2) if last > 0 else ()}
    if spec not in presets:
        raise ValueError(f"expert_layers preset {spec!r}: expected one of {', '.join(EXPERT_LAYER_PRESETS)} "
                         f"or a list of layer indices")
    return tuple(presets[spec])


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig:
    """Architecture (defaults: CogVideoX-5B-I2V + VAP, experts on layers 0–40) and run options."""
    num_heads: int = 48
    head_dim: int = 64
    in_channels: int = 32
    out_channels: int = 16
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 42
    patch_size: int = 2
    sample_height: int = 60          # latent size the learned position table was made for
    sample_width: int = 90
    sample_frames: int = 49          # pixel frames; latent frames = (49 − 1) / 4 + 1 = 13
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_rotary: bool = True
    use_learned_pos: bool = True
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    expert_layers: tuple[int, ...] = tuple(range(41))  # or a preset name (expert_layer_preset)
    # Ablation switches (see STRUCTURES, REF_ROPES).
    structure: str = "mot"
    ref_rope: str = "shifted"
    lora_rank: int = 0               # single_branch_lora only
    ref_head: bool = False           # the expert's own output head (official reference_train_mode=
                                     # "reference_independent"): `ref_output=True` also predicts the reference
    # Run options (not architecture).
    dtype: str = "float32"           # compute dtype; norms statistics, RoPE and timestep features stay fp32
    param_dtype: str = "float32"
    attention: str | None = None     # vapjax.attention implementation: None (auto) | "xla" | "cudnn" | "blockwise"
    remat: str = "none"              # per-layer rematerialisation: "none" | "full" | "dots"
    stream_layers: bool = False      # layers arrive from host memory (offload="layers", vapjax.offload)
    quantize: str = ""               # "int8": the backbone's layer kernels stored as int8 (vapjax.quantize)

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def has_expert(self) -> bool:
        return self.structure not in SINGLE_BRANCH

    @property
    def latent_frames(self) -> int:
        return (self.sample_frames - 1) // self.temporal_compression_ratio + 1

    def with_options(self, **kw) -> "CogVideoXConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_diffusers(cls, d: dict, **options) -> "CogVideoXConfig":
        """From an official (MoT) or stock diffusers CogVideoX transformer config.json."""
        for key, ok in _UNSUPPORTED.items():
            if d.get(key, ok) != ok:
                raise ValueError(f"CogVideoX config field {key}={d[key]!r} is not supported (only {ok!r})")
        flags = {k: d.get(k, False) for k in ("ablation_single_encoder", "ablation_residual_addition")}
        if any(v not in (True, False) for v in flags.values()) or all(flags.values()):
            raise ValueError(f"CogVideoX ablation flags {flags}: expected at most one of them true "
                             f"(the official model defines no other combination)")
        structure = ("unidirectional_cross_attn" if flags["ablation_single_encoder"] else
                     "residual_addition" if flags["ablation_residual_addition"] else "mot")
        options = {"structure": structure, **options}
        return cls(
            num_heads=d["num_attention_heads"], head_dim=d["attention_head_dim"],
            in_channels=d["in_channels"], out_channels=d.get("out_channels") or d["in_channels"],
            time_embed_dim=d["time_embed_dim"], text_embed_dim=d["text_embed_dim"],
            num_layers=d["num_layers"], patch_size=d["patch_size"],
            sample_height=d["sample_height"], sample_width=d["sample_width"],
            sample_frames=d["sample_frames"], temporal_compression_ratio=d["temporal_compression_ratio"],
            max_text_seq_length=d["max_text_seq_length"], norm_eps=d["norm_eps"],
            flip_sin_to_cos=d["flip_sin_to_cos"], freq_shift=d["freq_shift"],
            use_rotary=d.get("use_rotary_positional_embeddings", False),
            use_learned_pos=d.get("use_learned_positional_embeddings", False),
            spatial_interpolation_scale=d["spatial_interpolation_scale"],
            temporal_interpolation_scale=d["temporal_interpolation_scale"],
            # A stock (non-MoT) config has no experts.
            expert_layers=tuple(sorted(d.get("block_idx_with_mot_ref", ()))),
            **options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CogVideoXConfig":
        return cls(**d)  # expert_layers: any sequence or a preset name (__post_init__)

    def __post_init__(self):
        # Expert slots are filled in layer order (the scan runs and the converter assume ascending).
        object.__setattr__(self, "expert_layers", expert_layer_preset(self.expert_layers, self.num_layers))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)
        bad = [i for i in self.expert_layers if not 0 <= i < self.num_layers]
        if bad or len(set(self.expert_layers)) != len(self.expert_layers):
            raise ValueError(f"expert_layers {self.expert_layers} must be distinct layers in [0, {self.num_layers})")
        if self.use_learned_pos and not self.use_rotary:
            raise ValueError("a learned position table without rotary embeddings does not exist in CogVideoX")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat={self.remat!r}: expected 'none', 'full' or 'dots'")
        if self.attention not in (None, *IMPLEMENTATIONS):
            raise ValueError(f"attention={self.attention!r}: expected None, {', '.join(map(repr, IMPLEMENTATIONS))}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure={self.structure!r}: expected one of {', '.join(STRUCTURES)}")
        if self.ref_rope not in REF_ROPES:
            raise ValueError(f"ref_rope={self.ref_rope!r}: expected one of {', '.join(REF_ROPES)}")
        if not self.has_expert and self.expert_layers:
            raise ValueError(f"structure={self.structure!r} has no expert: set expert_layers=()")
        if self.ref_head and not self.expert_layers:
            raise ValueError("ref_head=True is the expert's output head: it needs an expert (expert_layers)")
        if (self.structure == "single_branch_lora") != (self.lora_rank > 0):
            raise ValueError(f"lora_rank={self.lora_rank} with structure={self.structure!r}: "
                             f"single_branch_lora needs lora_rank > 0, the other structures 0")


# ----------------------------------------------------------------------------------------------
# Positions: sinusoidal timestep features, 3D RoPE (with the reference's temporal shift), and the
# absolute sin-cos table. All float32, as the reference computes them.
# ----------------------------------------------------------------------------------------------

def timestep_features(t: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Array:
    """Sinusoidal features of (possibly fractional) timesteps, [B] -> [B, dim], float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a (grid_h, grid_w) patch grid sits after an aspect-preserving resize into the base grid
    of the config's sample size (CPIPE:70-85). Positions of other sizes are interpolated into it."""
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rw, rh = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_positions(cfg: CogVideoXConfig, frames: int, grid_h: int, grid_w: int,
                   num_refs: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, h, w) positions of the video tokens of one stream (EMB:816-881).

    Target: t = 0 … T−1. References (`num_refs` = N > 0, concatenated on the frame axis), by
    `cfg.ref_rope`: 'shifted' (the 'continuous negative' shift, t = −N·T … −1, so the last reference
    sits just before the target; spatial positions as the target's), 'identical' (the target's
    positions for each reference) or 'shifted_tw' (as 'shifted', and w moved one target width left)."""
    base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    (top, left), (bottom, right) = crop_region(grid_h, grid_w, base_h, base_w)
    h = torch_linspace(top, bottom * (grid_h - 1) / grid_h, grid_h)
    w = torch_linspace(left, right * (grid_w - 1) / grid_w, grid_w)
    t = torch_linspace(0, frames * (frames - 1) / frames, frames)
    if not num_refs:
        return t, h, w
    if cfg.ref_rope == "identical":
        return np.tile(t, num_refs), h, w
    t = torch_linspace(-num_refs * frames, -1, num_refs * frames)
    if cfg.ref_rope == "shifted_tw":  # the target's width on the base grid is right − left
        w = w - np.float32(right - left)
    return t, h, w


def rope_tables(t: np.ndarray, h: np.ndarray, w: np.ndarray, head_dim: int, theta: float = 10000.0):
    """cos, sin tables [T·H·W, head_dim] for tokens ordered (t, h, w); the head vector is split
    [t: head_dim/4 | h: 3·head_dim/8 | w: 3·head_dim/8], each frequency repeated for its pair."""
    def axis(pos, dim):
        freqs = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
        ang = jnp.asarray(pos, jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
        return jnp.repeat(ang, 2, axis=-1)
    dt, dh = head_dim // 4, head_dim // 8 * 3
    at, ah, aw = axis(t, dt), axis(h, dh), axis(w, dh)
    T, H, W = len(t), len(h), len(w)
    ang = jnp.concatenate([
        jnp.broadcast_to(at[:, None, None], (T, H, W, dt)),
        jnp.broadcast_to(ah[None, :, None], (T, H, W, dh)),
        jnp.broadcast_to(aw[None, None, :], (T, H, W, dh)),
    ], axis=-1).reshape(T * H * W, -1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate consecutive pairs (x₂ⱼ, x₂ⱼ₊₁) of x [B, S, N, D] by the table angles, in float32."""
    x32 = x.astype(jnp.float32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


def _sincos_1d(dim: int, pos: Array) -> Array:
    omega = 1.0 / 10000 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))
    ang = pos.reshape(-1)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


def sincos_position_table(cfg: CogVideoXConfig, latent_frames: int, grid_h: int, grid_w: int) -> Array:
    """Absolute 3D sin-cos table [text rows (zeros); T·H·W video rows] (EMB get_3d_sincos_pos_embed):
    per video token [temporal D/4 | width 3D/8 | height 3D/8]."""
    d = cfg.dim
    hs = jnp.arange(grid_h, dtype=jnp.float32) / cfg.spatial_interpolation_scale
    ws = jnp.arange(grid_w, dtype=jnp.float32) / cfg.spatial_interpolation_scale
    ts = jnp.arange(latent_frames, dtype=jnp.float32) / cfg.temporal_interpolation_scale
    ds = 3 * d // 4
    spatial = jnp.concatenate([
        _sincos_1d(ds // 2, jnp.broadcast_to(ws[None, :], (grid_h, grid_w))),
        _sincos_1d(ds // 2, jnp.broadcast_to(hs[:, None], (grid_h, grid_w))),
    ], axis=-1)                                                     # [H·W, 3D/4]
    temporal = _sincos_1d(d // 4, ts)                               # [T, D/4]
    video = jnp.concatenate([
        jnp.broadcast_to(temporal[:, None], (latent_frames, grid_h * grid_w, d // 4)),
        jnp.broadcast_to(spatial[None], (latent_frames, grid_h * grid_w, ds)),
    ], axis=-1).reshape(-1, d)
    return jnp.concatenate([jnp.zeros((cfg.max_text_seq_length, d), jnp.float32), video], axis=0)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics and affine, output in the compute dtype."""
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _dense(cfg: CogVideoXConfig, features: int, name: str) -> lora.Dense:
    return lora.Dense(features, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name)


class LayerNormZero(nn.Module):
    """adaLN-Zero for both token kinds of a stream (NORM:449-470): one Linear(SiLU(emb)) gives
    (shift, scale, gate) for video and (shift, scale, gate) for text; one LayerNorm for both."""
    cfg: CogVideoXConfig

    @nn.compact
    def __call__(self, video: Array, text: Array, emb: Array):
        c = self.cfg
        mod = _dense(c, 6 * c.dim, "linear")(nn.silu(emb))[:, None]
        shift, scale, gate, t_shift, t_scale, t_gate = jnp.split(mod, 6, axis=-1)
        norm = LayerNorm(c.norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), name="norm")
        return (norm(video) * (1 + scale) + shift, norm(text) * (1 + t_scale) + t_shift, gate, t_gate)


class Attention(nn.Module):
    """Projections of one stream's attention: Q/K/V with per-head LayerNorm (eps 1e-6), and the output."""
    cfg: CogVideoXConfig

    def setup(self):
        c = self.cfg
        self.to_q, self.to_k, self.to_v = (_dense(c, c.dim, n) for n in ("to_q", "to_k", "to_v"))
        self.norm_q = LayerNorm(1e-6, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
        self.norm_k = LayerNorm(1e-6, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype))
        self.to_out = _dense(c, c.dim, "to_out")

    def qkv(self, x: Array):
        heads = lambda y: y.reshape(*y.shape[:-1], self.cfg.num_heads, self.cfg.head_dim)
        return self.norm_q(heads(self.to_q(x))), self.norm_k(heads(self.to_k(x))), heads(self.to_v(x))

    def out(self, o: Array) -> Array:
        return self.to_out(o.reshape(*o.shape[:-2], -1))


class FeedForward(nn.Module):
    cfg: CogVideoXConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.gelu(_dense(self.cfg, 4 * self.cfg.dim, "proj_in")(x), approximate=True)
        return _dense(self.cfg, self.cfg.dim, "proj_out")(h)


def attention(q: Array, k: Array, v: Array, implementation: str | None) -> Array:
    """Full bidirectional softmax attention, [B, S, N, D], scale 1/√D, through the one entry point
    (vapjax.attention picks cuDNN, blockwise or XLA), with the heads' logical sharding axes."""
    q, k, v = (constrain(a, HEADS) for a in (q, k, v))
    return constrain(attention_paths.attention(q, k, v, implementation), HEADS)


class Block(nn.Module):
    """One stream's half of a CogVideoX layer. Split around attention so that an expert layer can
    join the two streams' Q/K/V (COG:375-513); `__call__` is the stock single-stream layer."""
    cfg: CogVideoXConfig

    def setup(self):
        self.norm1 = LayerNormZero(self.cfg)
        self.attn = Attention(self.cfg)
        self.norm2 = LayerNormZero(self.cfg)
        self.ff = FeedForward(self.cfg)

    def qkv(self, video: Array, text: Array, emb: Array, rope):
        video_m, text_m, gate, t_gate = self.norm1(video, text, emb)
        q, k, v = self.attn.qkv(jnp.concatenate([text_m, video_m], axis=1))
        if rope is not None:  # video tokens only; text tokens get no rotation
            # (concatenate, not `.at[:, s:].set`: XLA:CPU miscompiles the latter when heads are sharded)
            s = text.shape[1]
            q = jnp.concatenate([q[:, :s], apply_rope(q[:, s:], *rope)], axis=1)
            k = jnp.concatenate([k[:, :s], apply_rope(k[:, s:], *rope)], axis=1)
        return (q, k, v), (gate, t_gate)

    def finish(self, video: Array, text: Array, o: Array, gates, emb: Array):
        s = text.shape[1]
        a = self.attn.out(o)
        video = video + gates[0] * a[:, s:]
        text = text + gates[1] * a[:, :s]
        video_m, text_m, gate, t_gate = self.norm2(video, text, emb)
        f = self.ff(jnp.concatenate([text_m, video_m], axis=1))
        return video + gate * f[:, s:], text + t_gate * f[:, :s]

    def __call__(self, video, text, emb, rope=None):
        qkv, gates = self.qkv(video, text, emb, rope)
        return self.finish(video, text, attention(*qkv, self.cfg.attention), gates, emb)


class PatchEmbed(nn.Module):
    """Caption projection + non-overlapping p×p patches of each latent frame, tokens (f, h, w),
    plus (for CogVideoX-5B-I2V) the learned absolute position table over [text; video] rows."""
    cfg: CogVideoXConfig

    @nn.compact
    def __call__(self, latents: Array, text: Array):
        c = self.cfg
        b, f, hh, ww, ch = latents.shape
        p = c.patch_size
        # (C, p, p) order inside a patch matches the official Conv2d weight layout.
        patches = latents.reshape(b, f, hh // p, p, ww // p, p, ch).transpose(0, 1, 2, 4, 6, 3, 5)
        video = _dense(c, c.dim, "proj")(patches.reshape(b, f * (hh // p) * (ww // p), ch * p * p))
        text = _dense(c, c.dim, "text_proj")(text)
        if c.use_learned_pos:
            table = self.param("pos_embedding", lambda _: sincos_position_table(
                c, c.latent_frames, c.sample_height // p, c.sample_width // p).astype(jnp.dtype(c.param_dtype)))
        if c.use_learned_pos or not c.use_rotary:
            if text.shape[1] != c.max_text_seq_length:
                raise ValueError(f"caption length {text.shape[1]} != max_text_seq_length {c.max_text_seq_length}")
            if c.use_learned_pos and (hh, ww) != (c.sample_height, c.sample_width):
                raise ValueError(f"latent size {hh}x{ww}: this model's learned position table fixes it to "
                                 f"{c.sample_height}x{c.sample_width} (pixels x8)")
            if not (c.use_learned_pos and f == c.latent_frames):  # other frame counts: sin-cos table (EMB:743-751)
                table = sincos_position_table(c, f, hh // p, ww // p)
            table = table.astype(video.dtype)
            text = text + table[:text.shape[1]]
            video = video + table[text.shape[1]:]
        return video, text


class TimestepEmbedding(nn.Module):
    cfg: CogVideoXConfig

    @nn.compact
    def __call__(self, t: Array) -> Array:
        c = self.cfg
        x = timestep_features(t, c.dim, c.flip_sin_to_cos, c.freq_shift).astype(jnp.dtype(c.dtype))
        return _dense(c, c.time_embed_dim, "linear_2")(nn.silu(_dense(c, c.time_embed_dim, "linear_1")(x)))


class AdaLayerNorm(nn.Module):
    """LayerNorm modulated by Linear(SiLU(emb)), chunk order (shift, scale) (NORM:28-82)."""
    cfg: CogVideoXConfig

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        c = self.cfg
        shift, scale = jnp.split(_dense(c, 2 * c.dim, "linear")(nn.silu(emb))[:, None], 2, axis=-1)
        return LayerNorm(c.norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), name="norm")(x) * (1 + scale) + shift


class OutputHead(nn.Module):
    """norm_final → norm_out (AdaLayerNorm) → proj_out to p·p·C values per token."""
    cfg: CogVideoXConfig

    @nn.compact
    def __call__(self, video: Array, emb: Array) -> Array:
        c = self.cfg
        x = LayerNorm(c.norm_eps, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), name="norm_final")(video)
        x = AdaLayerNorm(c, name="norm_out")(x, emb)
        return _dense(c, c.patch_size ** 2 * c.out_channels, "proj_out")(x)


class Stream(nn.Module):
    """One stream's parameters: embeddings, a stack of `num_blocks` blocks (leading axis = layer),
    and, for the backbone, the output head."""
    cfg: CogVideoXConfig
    num_blocks: int
    with_head: bool
    quantize: str = ""  # the stack's kernels as stored (vapjax.quantize): the frozen backbone's may be int8

    def setup(self):
        c = self.cfg
        self.patch_embed = PatchEmbed(c)
        self.time_embedding = TimestepEmbedding(c)
        self.blocks = lora.stacked_param(self, "blocks", self._init_blocks)  # LoRA factors may sit beside kernels
        if self.with_head:
            self.head = OutputHead(c)

    def _init_blocks(self, rng):
        c = self.cfg
        dummy = (jnp.zeros((1, 1, c.dim)), jnp.zeros((1, 1, c.dim)), jnp.zeros((1, c.time_embed_dim)))
        init = lambda r: Block(c, parent=None).init(r, *dummy)["params"]
        return quantize.quantize_stack(jax.vmap(init)(jax.random.split(rng, self.num_blocks)), self.quantize)

    def embed(self, latents, text, t):
        return self.patch_embed(latents, text), self.time_embedding(t)

    def __call__(self, latents, text, t):  # for init only
        (video, _), emb = self.embed(latents, text, t)
        return self.head(video, emb) if self.with_head else video


def layer_runs(num_layers: int, expert_layers: Sequence[int]) -> list[tuple[int, int, bool]]:
    """Maximal runs [start, stop) of consecutive layers that all have, or all lack, an expert.
    Each run is one `lax.scan`, so 0–40 + 41 compiles two block bodies, not 42."""
    has = [i in set(expert_layers) for i in range(num_layers)]
    runs, start = [], 0
    for i in range(1, num_layers + 1):
        if i == num_layers or has[i] != has[start]:
            runs.append((start, i, has[start]))
            start = i
    return runs


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class CogVideoXTransformer(nn.Module):
    """Backbone + expert. `__call__(latents, text, t, ref_latents, ref_text, ref_t)` returns the backbone's
    prediction for the target (v-prediction for CogVideoX), [B, F, H, W, out_channels].

    latents     [B, F, H, W, in_channels]   noisy target latents ⊕ image-condition latents
    text        [B, S, text_embed_dim]      target caption embeddings
    t           [B]                         diffusion timestep (the expert is modulated by it too)
    ref_latents [B, N·F, H, W, in_channels] clean reference latents ⊕ reference first-frame latents,
                                            N references concatenated on frames (None: plain CogVideoX)
    ref_text    [B, N·S, text_embed_dim]    reference captions, concatenated in the same order
    ref_t       [B] or None                 the reference's own timestep for the expert's adaLN (a noisy
                                            reference, Diffusion-Forcing style); None: the target's `t`
    ref_output  bool                        also return the reference's prediction [B, N·F, H, W, C] from
                                            the expert's head (ref_head=True; the noisy-reference loss)
    """
    cfg: CogVideoXConfig

    def setup(self):
        c = self.cfg
        self.backbone = Stream(c, c.num_layers, with_head=True, quantize=c.quantize, name="backbone")
        if c.expert_layers:
            self.expert = Stream(c, len(c.expert_layers), with_head=c.ref_head, name="expert")
        if c.structure == "single_branch_lora":
            self.lora = self.param("lora", self._init_lora)

    def _init_lora(self, rng):
        """{'blocks': {target: {lora_a [L, D, r], lora_b [L, r, D] = 0}}} (stacked per layer like the
        streams' blocks), as PEFT initialises its default LoRA: A kaiming-uniform with a = √5, i.e.
        U(±1/√D) for fan-in D; zero B, so the output at initialisation is the backbone's."""
        c = self.cfg
        dt = jnp.dtype(c.param_dtype)
        keys = jax.random.split(rng, len(LORA_TARGETS))
        bound = 1.0 / math.sqrt(c.dim)
        return {"blocks": {
            name: {"lora_a": jax.random.uniform(k, (c.num_layers, c.dim, c.lora_rank), jnp.float32,
                                                -bound, bound).astype(dt),
                   "lora_b": jnp.zeros((c.num_layers, c.lora_rank, c.dim), dt)}
            for name, k in zip(LORA_TARGETS, keys)}}

    def __call__(self, latents: Array, text: Array, t: Array,
                 ref_latents: Array | None = None, ref_text: Array | None = None,
                 ref_t: Array | None = None, ref_output: bool = False):
        c = self.cfg
        b, f, hh, ww, _ = latents.shape
        p = c.patch_size
        gh, gw = hh // p, ww // p
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        (video, text_tok), emb = self.backbone.embed(latents, text, t)
        rope = rope_tables(*rope_positions(c, f, gh, gw), c.head_dim) if c.use_rotary else None

        use_ref = ref_latents is not None
        if use_ref and ref_text is None:
            raise ValueError("reference latents need reference caption embeddings (ref_text)")
        if use_ref and c.has_expert and not c.expert_layers:
            raise ValueError("this checkpoint has no expert: it cannot take a reference video")
        if ref_t is not None and not (use_ref and c.has_expert):
            raise ValueError(f"ref_t drives the expert's adaLN: it needs a reference and an expert "
                             f"(structure={c.structure!r})")
        n_ref_video = 0  # single branch: reference video tokens at the front of the backbone's sequence
        if use_ref and not c.has_expert:
            # Single branch: the reference's video tokens join the backbone's one sequence, and its
            # caption does not: the official model patch-embeds the reference with the *target's* caption
            # and keeps only the video rows (stock cogvideox_transformer_3d.py:480-489, CSPEC:758-766).
            # [tgt_text, ref_video, tgt_video] is the official [tgt_text, tgt_video, ref_video] up to a
            # permutation of tokens with their RoPE rows, which unmasked attention does not see.
            ref_video, _, rope_ref, _ = self._embed_refs(self.backbone, ref_latents, ref_text, f)
            n_ref_video = ref_video.shape[1]
            video = jnp.concatenate([ref_video, video], 1)
            if rope is not None:
                rope = tuple(jnp.concatenate(ab, 0) for ab in zip(rope_ref, rope))
            use_ref = False
        emb_ref = rope_ref = rope_alone = None
        if use_ref:
            ref_video, ref_tok, rope_ref, n = self._embed_refs(self.expert, ref_latents, ref_text, f)
            # The expert's adaLN is driven by the target timestep (COG:944-949), shared by all refs,
            # or by the reference's own (a noisy reference).
            emb_ref = self.expert.time_embedding(t if ref_t is None else jnp.broadcast_to(jnp.asarray(ref_t), (b,)))
            if rope is not None:  # A3/A4: the expert alone sees the target's positions (COG:218-223), per reference
                rope_alone = tuple(jnp.tile(a, (n, 1)) for a in rope)
            if c.structure == "residual_addition" and ref_video.shape != video.shape:
                raise ValueError(f"structure='residual_addition' adds the reference to the target: it needs "
                                 f"one reference of the target's size, got {n}")
        runs = layer_runs(c.num_layers, c.expert_layers if use_ref else ())
        lora_blocks = self.lora["blocks"] if c.structure == "single_branch_lora" else None

        state = (video, text_tok) + ((ref_video, ref_tok) if use_ref else ())
        expert_offset = 0
        for start, stop, joint in runs:
            if joint:
                stacks, firsts = (self.backbone.blocks, self.expert.blocks), (start, expert_offset)
                expert_offset += stop - start
                body = lambda s, pp: (_expert_layer(c, pp[0], pp[1], s, emb, emb_ref, rope, rope_ref, rope_alone),
                                      None)
            else:
                stacks = (self.backbone.blocks,) + (() if lora_blocks is None else (lora_blocks,))
                firsts = (start,) * len(stacks)

                def body(s, pl):  # the reference stream, if any, passes through unchanged
                    s = tuple(constrain(x, TOKENS) for x in s)
                    pb = pl[0] if lora_blocks is None else with_lora(*pl)
                    return Block(c, parent=None).apply({"params": pb}, s[0], s[1], emb, rope) + s[2:], None
            state, _ = offload.scan_layers(self._remat(body), state, stacks, firsts, stop - start,
                                           stream=c.stream_layers)

        unpatch = lambda x, frames: x.reshape(b, frames, gh, gw, c.out_channels, p, p).transpose(
            0, 1, 2, 5, 3, 6, 4).reshape(b, frames, hh, ww, c.out_channels)
        out = unpatch(self.backbone.head(state[0][:, n_ref_video:], emb), f)    # [B, F·h·w, p·p·C] -> latents
        if not ref_output:
            return out
        if not (c.ref_head and use_ref):
            raise ValueError("ref_output needs the expert's output head (ref_head=True) and a reference")
        # The reference's own prediction (COG:1065-1087): its video tokens after the last expert layer
        # through the expert's head, modulated by the expert's embedding.
        return out, unpatch(self.expert.head(state[2], emb_ref), ref_video.shape[1] // (gh * gw))

    def init_all(self, latents, text, t):
        """Creates every parameter without running the layer stack (cheap `init`)."""
        out = self.backbone(latents, text, t)
        if self.cfg.expert_layers:
            self.expert(latents, text, t)
        return out

    def _embed_refs(self, stream, ref_latents, ref_text, frames):
        """(video, text, RoPE tables, N): each reference is patch-embedded by `stream` on its own (same
        learned table, unshifted) and the results concatenated: text [txt₁ … txt_N], video [vid₁ … vid_N]
        (COG:977-1006). N may be 0 (an empty reference)."""
        c = self.cfg
        b, nf, hh, ww, ch = ref_latents.shape
        if nf % frames:
            raise ValueError(f"reference has {nf} latent frames, not a multiple of the target's {frames}")
        n = nf // frames
        s = ref_text.shape[1] // n if n else 0
        if ref_text.shape[1] != n * s:
            raise ValueError(f"reference text length {ref_text.shape[1]} does not split into {n} captions")
        video, text_tok = stream.patch_embed(ref_latents.reshape(b * n, frames, hh, ww, ch),
                                             ref_text.reshape(b * n, s, ref_text.shape[-1]))
        video = video.reshape(b, -1, c.dim)
        text_tok = text_tok.reshape(b, -1, c.dim)
        gh, gw = hh // c.patch_size, ww // c.patch_size
        rope_ref = None
        if c.use_rotary:
            rope_ref = (rope_tables(*rope_positions(c, frames, gh, gw, num_refs=n), c.head_dim) if n else
                        (jnp.zeros((0, c.head_dim), jnp.float32),) * 2)
        return video, text_tok, rope_ref, n

    def _remat(self, body):
        """A scanned layer body as the run options ask: its layer streamed in from host memory and its
        int8 kernels dequantised (vapjax.offload.layer_body), and rematerialised."""
        body = offload.layer_body(body, stream=self.cfg.stream_layers, dtype=self.cfg.param_dtype)
        if self.cfg.remat == "none":
            return body
        return jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat])


def with_lora(block_params, lora_params):
    """One backbone layer's parameters with its LoRA factors beside the attention projections' kernels,
    where `lora.Dense` adds (x·A)·B to x·W (scale α/r = 1): not merged into W, whose bf16 grid would
    swallow small updates."""
    attn = dict(block_params["attn"])
    for name, ab in lora_params.items():
        attn[name] = {**attn[name], "lora_down": ab["lora_a"], "lora_up": ab["lora_b"]}
    return {**block_params, "attn": attn}


def _expert_layer(cfg: CogVideoXConfig, p_backbone, p_expert, state, emb, emb_ref, rope, rope_ref, rope_alone):
    """A layer with an expert, by `cfg.structure`. mot: `_joint_layer`. The two ablations first run the
    expert block on the reference alone, with the target's (unshifted) positions `rope_alone` and the
    expert's own adaLN (COG:205-240, 293-328); then
      unidirectional_cross_attn: the frozen block's attention takes its keys and values over
        target ⊕ reference — the reference projected by the frozen block itself (its norm1 with the
        target's emb, q/k/v, RoPE `rope_ref`) — and only the target's rows are kept (COG:243-290);
      residual_addition: the frozen block runs as usual and the expert's output is added to the
        target's, text to text and video to video (COG:331-372)."""
    if cfg.structure == "mot":
        return _joint_layer(cfg, p_backbone, p_expert, state, emb, emb_ref, rope, rope_ref)
    video, text, ref_video, ref_text = (constrain(s, TOKENS) for s in state)
    block = Block(cfg, parent=None)  # applied functionally to sliced stacked params
    ref_video, ref_text = block.apply({"params": p_expert}, ref_video, ref_text, emb_ref, rope_alone)
    if cfg.structure == "residual_addition":
        video, text = block.apply({"params": p_backbone}, video, text, emb, rope)
        return video + ref_video, text + ref_text, ref_video, ref_text
    (q, k, v), gates = block.apply({"params": p_backbone}, video, text, emb, rope, method=Block.qkv)
    (_, kr, vr), _ = block.apply({"params": p_backbone}, ref_video, ref_text, emb, rope_ref, method=Block.qkv)
    o = attention(q, jnp.concatenate([k, kr], 1), jnp.concatenate([v, vr], 1), cfg.attention)
    video, text = block.apply({"params": p_backbone}, video, text, o, gates, emb, method=Block.finish)
    return video, text, ref_video, ref_text


def _joint_layer(cfg: CogVideoXConfig, p_backbone, p_expert, state, emb, emb_ref, rope, rope_ref):
    """An expert layer: each stream modulates and projects with its own weights, then one joint
    attention over [tgt_text, tgt_video, ref_text, ref_video], then each stream's own out-projection,
    residuals and FFN. The only interaction between the streams is this attention."""
    video, text, ref_video, ref_text = (constrain(s, TOKENS) for s in state)
    block = Block(cfg, parent=None)  # applied functionally to sliced stacked params
    (q, k, v), gates = block.apply({"params": p_backbone}, video, text, emb, rope, method=Block.qkv)
    (qr, kr, vr), gates_r = block.apply({"params": p_expert}, ref_video, ref_text, emb_ref, rope_ref,
                                        method=Block.qkv)
    o = attention(jnp.concatenate([q, qr], 1), jnp.concatenate([k, kr], 1), jnp.concatenate([v, vr], 1),
                  cfg.attention)
    n = q.shape[1]
    video, text = block.apply({"params": p_backbone}, video, text, o[:, :n], gates, emb, method=Block.finish)
    ref_video, ref_text = block.apply({"params": p_expert}, ref_video, ref_text, o[:, n:], gates_r, emb_ref,
                                      method=Block.finish)
    return video, text, ref_video, ref_text


def structure_unfreeze(cfg: CogVideoXConfig) -> str:
    """Regex (vapjax.training.is_trainable) of what `cfg.structure` trains beyond the expert and LoRA
    partitions: the single-branch full finetune trains the whole backbone except its position-table
    buffer (official 1-single_branch_full.sh); every other structure nothing more."""
    return r"^backbone/(?!patch_embed/pos_embedding$)" if cfg.structure == "single_branch" else ""


def dummy_inputs(cfg: CogVideoXConfig, batch: int = 1, frames: int | None = None, num_refs: int = 1,
                 dtype=jnp.float32):
    """Shape-correct zeros at the config's sample size (what the learned table requires)."""
    f = frames or cfg.latent_frames
    lat = jnp.zeros((batch, f, cfg.sample_height, cfg.sample_width, cfg.in_channels), dtype)
    txt = jnp.zeros((batch, cfg.max_text_seq_length, cfg.text_embed_dim), dtype)
    t = jnp.zeros((batch,), jnp.float32)
    if not num_refs or (cfg.has_expert and not cfg.expert_layers):
        return lat, txt, t
    return (lat, txt, t, jnp.concatenate([lat] * num_refs, 1), jnp.concatenate([txt] * num_refs, 1))


def init_params(cfg: CogVideoXConfig, rng: Array) -> dict:
    """Random parameters {'backbone': …, 'expert': …} (no 'expert' without expert layers)."""
    model = CogVideoXTransformer(cfg)
    init = lambda r: model.init(r, *dummy_inputs(cfg, frames=1, num_refs=0), method=model.init_all)["params"]
    return jax.jit(init)(rng)


def param_shapes(cfg: CogVideoXConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
