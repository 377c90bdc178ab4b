"""Wan2.1 3D causal VAE (diffusers `AutoencoderKLWan`) in Flax linen, channels-last.

Videos are [B, F, H, W, C] with pixels in [-1, 1]; latents are [B, f, h, w, z_dim]. With the released config
F = 4k + 1 frames map to f = k + 1 latent frames and 8x8 pixels to one latent pixel. Latents are normalised
per channel with the config's `latents_mean` / `latents_std` (`VAEConfig.normalize` / `denormalize`); the
pipeline and the training objective apply that, the VAE does not.

How the reference computes, and what of it matters here:

- Norms are channel-wise RMS norms (`x / max(|x|, 1e-12) * sqrt(C) * gamma`), per position: no statistic spans
  frames or pixels. Attention (middle blocks only) is single-head self-attention within each frame.
- Every 3x3x3 convolution is causal in time: output frame t sees inputs t-2..t, with zeros before the video.
- Time halving (encoder, `downsample3d`): the first frame passes through alone, then a stride-2 (3,1,1) conv
  over frames (0,1,2), (2,3,4), ... Time doubling (decoder, `upsample3d`): the first frame stays single; every
  later frame becomes two via a causal (3,1,1) conv whose history starts *after* the first frame (zeros).
- So the whole network is a causal function of the frames, and how time is chunked changes nothing but memory.
  We chunk as the reference does: the encoder takes the first frame, then 4 frames at a time (frames past the
  last full chunk are dropped, as there); the decoder one latent frame at a time. Each causal conv carries
  its last two input frames (zeros at first) to the next chunk; each time resampler carries its history.
- Decoded frames are clamped to [-1, 1].

Optional spatial tiling (`Tiling`) reproduces `enable_tiling`: overlapping tiles processed separately and
linearly blended with their already-blended upper and left neighbours.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vapjax.models.vae_common import Posterior, cross_fade, each_tile  # noqa: F401 (Posterior: public here too)

Array = jax.Array
Cache = Mapping[str, Any]  # nested like the modules; {} before the first chunk
Step = Callable[[Array, Cache], tuple[Array, Cache]]  # one chunk through the encoder or decoder

ENCODER_CHUNK = 4  # frames per encoder chunk after the first frame (hard-coded in the reference)
DECODER_CHUNK = 1  # latent frames per decoder chunk
_PAST = 2  # frames of history a kernel-3 causal conv needs

# Wan2.1's latent statistics (the diffusers defaults).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# diffusers config.json fields we read (renamed where the reference misspells); others are checked or inert.
_DIFFUSERS_FIELDS = {"base_dim": "base_dim", "decoder_base_dim": "decoder_base_dim", "z_dim": "z_dim",
                     "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
                     "temperal_downsample": "temporal_downsample", "in_channels": "in_channels",
                     "out_channels": "out_channels", "latents_mean": "latents_mean", "latents_std": "latents_std"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of the VAE; defaults are Wan2.1's. `dtype` is the compute dtype."""
    base_dim: int = 96
    decoder_base_dim: int | None = None  # None: base_dim
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder level but the last
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        object.__setattr__(self, "latents_mean", tuple(float(m) for m in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(s) for s in self.latents_std))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"Wan VAE config: temporal_downsample needs {len(self.dim_mult) - 1} entries "
                             f"(one per level but the last), got {len(self.temporal_downsample)}")
        if self.temporal_compression > ENCODER_CHUNK:
            raise ValueError(f"Wan VAE config: at most {int(math.log2(ENCODER_CHUNK))} temporal downsamples "
                             f"(the encoder's {ENCODER_CHUNK}-frame chunks), got {sum(self.temporal_downsample)}")
        if not len(self.latents_mean) == len(self.latents_std) == self.z_dim:
            raise ValueError(f"Wan VAE config: latents_mean/latents_std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")

    @property
    def encoder_widths(self) -> tuple[int, ...]:
        """Output channels of each encoder level."""
        return tuple(self.base_dim * m for m in self.dim_mult)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """Output channels of each decoder level (deepest first)."""
        return tuple((self.decoder_base_dim or self.base_dim) * m for m in self.dim_mult[::-1])

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a video of `frames` frames (1 + (frames - 1) // 4 with the released config)."""
        return 1 + (frames - 1) // ENCODER_CHUNK * (ENCODER_CHUNK // self.temporal_compression)

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        # The reference multiplies by the float32 reciprocal 1/std (pipeline and training alike); dividing by
        # std instead differs in the last bit.
        mean = np.asarray(self.latents_mean, np.float32)
        return mean, np.float32(1) / np.asarray(self.latents_std, np.float32)

    def normalize(self, z: Array) -> Array:
        """(z - mean) / std per latent channel (last axis), computed in float32 as the reference does."""
        mean, inv_std = self._stats()
        return ((z.astype(jnp.float32) - mean) * inv_std).astype(z.dtype)

    def denormalize(self, z: Array) -> Array:
        """The inverse: z * std + mean, computed as z / (1/std) + mean like the reference's decode."""
        mean, inv_std = self._stats()
        return (z.astype(jnp.float32) / inv_std + mean).astype(z.dtype)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides) -> "VAEConfig":
        """From a diffusers `AutoencoderKLWan` config.json; `overrides` sets e.g. dtype. Wan2.2's variant
        (residual blocks, patchified pixels) and encoder attention are not supported."""
        expected = {"attn_scales": [], "is_residual": False, "patch_size": None}
        for key, want in expected.items():
            if key in config and config[key] != want:
                raise ValueError(f"Wan VAE config: unsupported {key}={config[key]!r} (expected {want!r})")
        cfg = cls(**{ours: config[theirs] for theirs, ours in _DIFFUSERS_FIELDS.items() if theirs in config},
                  **overrides)
        # Stock diffusers sizes its tiles with these; they must describe this architecture.
        for key, value in (("scale_factor_spatial", cfg.spatial_compression),
                           ("scale_factor_temporal", cfg.temporal_compression)):
            if config.get(key) is not None and config[key] != value:
                raise ValueError(f"Wan VAE config: {key}={config[key]!r} but the architecture gives {value}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Spatial tiling as diffusers' `enable_tiling` for Wan: tile size and stride in pixels."""
    sample_height: int = 256
    sample_width: int = 256
    stride_height: int = 192
    stride_width: int = 192


# ----------------------------------------------------------------------------------------------------------
# Layers


def _conv(cfg: VAEConfig, features: int, kernel: tuple[int, ...], name: str, **kw) -> nn.Conv:
    return nn.Conv(features, kernel, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name, **kw)


def _pointwise(cfg: VAEConfig, features: int, name: str) -> nn.Dense:
    """A 1x1(x1) convolution is a Dense over channels."""
    return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def _zeros_frames(x: Array, frames: int) -> Array:
    return jnp.zeros((x.shape[0], frames) + x.shape[2:], x.dtype)


def _causal(conv: nn.Module, x: Array, past: Array | None) -> tuple[Array, Array]:
    """`conv` (valid in time) over x preceded by two frames of history (zeros at the start of the video).
    Returns the output, one frame per input frame, and the history for the next chunk."""
    x = jnp.concatenate([_zeros_frames(x, _PAST) if past is None else past, x], axis=1)
    return conv(x), x[:, -_PAST:]


def _causal_conv(cfg: VAEConfig, features: int, name: str) -> nn.Conv:
    """3x3x3, valid in time (the history is prepended by `_causal`), zero-padded by one in space."""
    return _conv(cfg, features, (3, 3, 3), name, padding=((0, 0), (1, 1), (1, 1)))


class RMSNorm(nn.Module):
    """`WanRMS_norm`: x / max(‖x‖₂, 1e-12) · √C · gamma over channels, normalised in float32."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        gamma = self.param("scale", nn.initializers.ones, (channels,), self.cfg.param_dtype)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        unit = (x32 / jnp.maximum(norm, 1e-12)).astype(self.cfg.dtype)
        return unit * math.sqrt(channels) * gamma.astype(self.cfg.dtype)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1-projected when channels change) skip."""
    cfg: VAEConfig
    features: int

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        cfg = self.cfg
        skip = x if x.shape[-1] == self.features else _pointwise(cfg, self.features, "conv_shortcut")(x)
        h = nn.silu(RMSNorm(cfg, name="norm1")(x))
        h, conv1 = _causal(_causal_conv(cfg, self.features, "conv1"), h, cache.get("conv1"))
        h = nn.silu(RMSNorm(cfg, name="norm2")(h))  # (dropout here is inert at inference)
        h, conv2 = _causal(_causal_conv(cfg, self.features, "conv2"), h, cache.get("conv2"))
        return h + skip, {"conv1": conv1, "conv2": conv2}


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame, residual."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, (batch, frames, height, width, channels) = self.cfg, x.shape
        qkv = _pointwise(cfg, 3 * channels, "to_qkv")(RMSNorm(cfg, name="norm")(x))
        q, k, v = jnp.split(qkv.reshape(batch * frames, height * width, 3 * channels), 3, axis=-1)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(channels)
        weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("nqk,nkc->nqc", weights, v).reshape(x.shape)
        return x + _pointwise(cfg, channels, "proj")(out)


class MidBlock(nn.Module):
    """Residual block, attention, residual block."""
    cfg: VAEConfig
    features: int

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        x, first = ResidualBlock(self.cfg, self.features, name="resnets_0")(x, cache.get("resnets_0", {}))
        x = AttentionBlock(self.cfg, name="attentions_0")(x)
        x, second = ResidualBlock(self.cfg, self.features, name="resnets_1")(x, cache.get("resnets_1", {}))
        return x, {"resnets_0": first, "resnets_1": second}


class Resample(nn.Module):
    """`WanResample`: 2x down/up in space by a per-frame 3x3 conv, and in time for the "3d" modes.

    - downsample: right/bottom zero pad, stride 2; then (3d) time halving: frame 0 alone, then a stride-2
      (3,1,1) conv over (0,1,2), (2,3,4), ...; the cache is the chunk's last frame.
    - upsample: (3d) time doubling first: frame 0 stays single, every later frame t yields two frames (the two
      channel halves of a causal (3,1,1) conv over frames 1..t, zeros before frame 1); then nearest 2x and a
      3x3 conv to half the channels.
    `cache` is None for the video's first chunk.
    """
    cfg: VAEConfig
    mode: str  # downsample2d | downsample3d | upsample2d | upsample3d

    @nn.compact
    def __call__(self, x: Array, cache: Array | None) -> tuple[Array, Array | None]:
        cfg, channels = self.cfg, x.shape[-1]
        new = None
        if self.mode == "upsample3d":
            x, new = self._double_frames(x, cache)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            return _conv(cfg, channels // 2, (3, 3), "conv", padding=1)(x), new
        x = _conv(cfg, channels, (3, 3), "conv", strides=2, padding=((0, 1), (0, 1)))(x)
        if self.mode == "downsample3d":
            x, new = self._halve_frames(x, cache)
        return x, new

    def _halve_frames(self, x: Array, last: Array | None) -> tuple[Array, Array]:
        conv = _conv(self.cfg, x.shape[-1], (3, 1, 1), "time_conv", strides=(2, 1, 1), padding="VALID")
        if last is not None:
            out = conv(jnp.concatenate([last, x], axis=1))
        elif x.shape[1] > 1:
            out = jnp.concatenate([x[:, :1], conv(x)], axis=1)
        else:
            out = x
        return out, x[:, -1:]

    def _double_frames(self, x: Array, past: Array | None) -> tuple[Array, Array]:
        conv = _conv(self.cfg, 2 * x.shape[-1], (3, 1, 1), "time_conv", padding="VALID")
        head, tail = (x[:, :1], x[:, 1:]) if past is None else (x[:, :0], x)
        if past is None:
            past = _zeros_frames(x, _PAST)
        if tail.shape[1] == 0:
            return head, past
        doubled, past = _causal(conv, tail, past)
        batch, frames, height, width, channels = tail.shape
        doubled = doubled.reshape(batch, frames, height, width, 2, channels)
        doubled = jnp.moveaxis(doubled, 4, 2).reshape(batch, 2 * frames, height, width, channels)
        return jnp.concatenate([head, doubled], axis=1), past


class Encoder3D(nn.Module):
    """One chunk of video [B, F, H, W, in] -> posterior parameters [B, f, h, w, 2 z_dim] (mean ‖ logvar).

    Submodule names follow the reference's flat `down_blocks` list (residual blocks and resamplers in order).
    `quant_conv` is the reference's top-level 1x1x1 conv, applied to every chunk as its tiled encode does.
    """
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        cfg, widths = self.cfg, self.cfg.encoder_widths
        new = {}
        h, new["conv_in"] = _causal(_causal_conv(cfg, cfg.base_dim, "conv_in"), x, cache.get("conv_in"))
        n = 0
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                name = f"down_blocks_{n}"
                h, new[name] = ResidualBlock(cfg, width, name=name)(h, cache.get(name, {}))
                n += 1
            if level < len(widths) - 1:
                name = f"down_blocks_{n}"
                mode = "downsample3d" if cfg.temporal_downsample[level] else "downsample2d"
                h, new[name] = Resample(cfg, mode, name=name)(h, cache.get(name))
                n += 1
        h, new["mid_block"] = MidBlock(cfg, widths[-1], name="mid_block")(h, cache.get("mid_block", {}))
        h = nn.silu(RMSNorm(cfg, name="norm_out")(h))
        h, new["conv_out"] = _causal(_causal_conv(cfg, 2 * cfg.z_dim, "conv_out"), h, cache.get("conv_out"))
        return _pointwise(cfg, 2 * cfg.z_dim, "quant_conv")(h), new


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then an optional resampler (`upsample2d` / `upsample3d`)."""
    cfg: VAEConfig
    features: int
    mode: str | None

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        new = {}
        for j in range(self.cfg.num_res_blocks + 1):
            name = f"resnets_{j}"
            x, new[name] = ResidualBlock(self.cfg, self.features, name=name)(x, cache.get(name, {}))
        if self.mode is not None:
            x, new["upsample"] = Resample(self.cfg, self.mode, name="upsample")(x, cache.get("upsample"))
        return x, new


class Decoder3D(nn.Module):
    """One chunk of latents [B, f, h, w, z_dim] -> video [B, F, H, W, out] (not yet clamped).
    `post_quant_conv` is the reference's top-level 1x1x1 conv on the latents, applied per chunk."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, z: Array, cache: Cache) -> tuple[Array, Cache]:
        cfg, widths = self.cfg, self.cfg.decoder_widths
        temporal_upsample = cfg.temporal_downsample[::-1]
        new = {}
        z = _pointwise(cfg, cfg.z_dim, "post_quant_conv")(z)
        h, new["conv_in"] = _causal(_causal_conv(cfg, widths[0], "conv_in"), z, cache.get("conv_in"))
        h, new["mid_block"] = MidBlock(cfg, widths[0], name="mid_block")(h, cache.get("mid_block", {}))
        for level, width in enumerate(widths):
            mode = None
            if level < len(widths) - 1:
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
            name = f"up_blocks_{level}"
            h, new[name] = UpBlock(cfg, width, mode, name=name)(h, cache.get(name, {}))
        h = nn.silu(RMSNorm(cfg, name="norm_out")(h))
        h, new["conv_out"] = _causal(_causal_conv(cfg, cfg.out_channels, "conv_out"), h, cache.get("conv_out"))
        return h, new


# ----------------------------------------------------------------------------------------------------------
# Chunking over time, tiling over space


def _in_time_chunks(step: Step, chunk: int, x: Array) -> Array:
    """Run `step` on the first frame, then on `chunk`-frame pieces (a shorter remainder is dropped, as in the
    reference), carrying the cache. The later chunks go through one scanned step, so the program size does not
    grow with the frame count."""
    batch = x.shape[0]
    out, cache = step(x[:, :1], {})
    count = (x.shape[1] - 1) // chunk
    if count == 0:
        return out

    def body(cache, piece):
        out, cache = step(piece, cache)
        return cache, out

    rest = x[:, 1:1 + count * chunk].reshape(batch, count, chunk, *x.shape[2:]).swapaxes(0, 1)
    _, outs = jax.lax.scan(body, cache, rest)
    return jnp.concatenate([out, outs.swapaxes(0, 1).reshape(batch, -1, *outs.shape[3:])], axis=1)


class _TilePlan(NamedTuple):
    size: tuple[int, int]    # tile size, input positions
    stride: tuple[int, int]  # tile stride, input positions
    blend: tuple[int, int]   # cross-fade extent, output positions
    keep: tuple[int, int]    # kept top-left part of each blended tile, output positions
    out: tuple[int, int]     # output height, width (the joined tiles are cropped to it)


def _tiled(step: Step, chunk: int, x: Array, plan: _TilePlan) -> Array:
    """Run `step` on tiles of x [B, F, H, W, C]; blend each output tile with its already-blended upper and left
    neighbours, keep its top-left part, join and crop."""
    height, width = x.shape[2:4]
    tops, lefts = range(0, height, plan.stride[0]), range(0, width, plan.stride[1])
    flat = each_tile(lambda t: _in_time_chunks(step, chunk, t), [x[:, :, i:i + plan.size[0], j:j + plan.size[1]] for i in tops for j in lefts])
    rows: list[list[Array]] = []
    for r in range(len(tops)):
        row: list[Array] = []
        for c in range(len(lefts)):
            tile = flat[r * len(lefts) + c]
            if rows:
                tile = cross_fade(rows[-1][c], tile, plan.blend[0], axis=2)
            if row:
                tile = cross_fade(row[-1], tile, plan.blend[1], axis=3)
            row.append(tile)
        rows.append(row)
    joined = jnp.concatenate(
        [jnp.concatenate([t[:, :, :plan.keep[0], :plan.keep[1]] for t in row], axis=3) for row in rows], axis=2)
    return joined[:, :, :plan.out[0], :plan.out[1]]


class AutoencoderKLWan(nn.Module):
    """The VAE: `encode(video) -> Posterior`, `decode(latents) -> video` clamped to [-1, 1].

    Call through `apply`, e.g. `model.apply({"params": p}, video, method="encode")`; both methods are
    jit-friendly (shapes and the chunk/tile layout are static). With `tiling` set, inputs larger than a
    tile are processed in blended spatial tiles, as the reference does after `enable_tiling`.
    """
    config: VAEConfig
    tiling: Tiling | None = None

    def setup(self):
        self.encoder = Encoder3D(self.config)
        self.decoder = Decoder3D(self.config)

    def __call__(self, video: Array) -> Array:
        """Creates the parameters (`init`): video [B, 5, H, W, C] as two encoder chunks, the posterior mean's
        two latent frames as two decoder chunks (the time resamplers only act from the second chunk)."""
        first, cache = self.encoder(video[:, :1], {})
        second, _ = self.encoder(video[:, 1:1 + ENCODER_CHUNK], cache)
        z = jnp.concatenate([first, second], axis=1)[..., :self.config.z_dim]
        out, cache = self.decoder(z[:, :1], {})
        return jnp.concatenate([out, self.decoder(z[:, 1:2], cache)[0]], axis=1)

    def _tile_plan(self, encoding: bool, height: int, width: int) -> _TilePlan | None:
        """The reference's tile layout for an input of height x width, or None when it needs no tiling."""
        t, ratio = self.tiling, self.config.spatial_compression
        pixels, strides = (t.sample_height, t.sample_width), (t.stride_height, t.stride_width)
        latents = tuple(p // ratio for p in pixels)
        latent_strides = tuple(s // ratio for s in strides)
        if encoding:
            if height <= pixels[0] and width <= pixels[1]:
                return None
            blend = tuple(m - s for m, s in zip(latents, latent_strides))
            return _TilePlan(pixels, strides, blend, latent_strides, (height // ratio, width // ratio))
        if height <= latents[0] and width <= latents[1]:
            return None
        blend = tuple(m - s for m, s in zip(pixels, strides))
        return _TilePlan(latents, latent_strides, blend, strides, (height * ratio, width * ratio))

    def _run(self, net: nn.Module, chunk: int, x: Array, encoding: bool) -> Array:
        """`net` over time chunks of x, in blended spatial tiles when tiling is on and x exceeds a tile."""
        # A pure function of the parameters, so that plain lax.scan / lax.map can loop over it (flax's
        # lifted nn.scan would trace the network twice per loop level).
        unbound, variables = net.unbind()

        def step(piece: Array, cache: Cache) -> tuple[Array, Cache]:
            return unbound.apply(variables, piece, cache)

        if self.tiling is not None:
            plan = self._tile_plan(encoding, *x.shape[2:4])
            if plan is not None:
                return _tiled(step, chunk, x, plan)
        return _in_time_chunks(step, chunk, x)

    def encode(self, video: Array) -> Posterior:
        """video [B, F, H, W, C] in [-1, 1] -> posterior over latents [B, f, h, w, z_dim]."""
        mean, logvar = jnp.split(self.moments(video), 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))

    def moments(self, video: Array) -> Array:
        """The encoder's raw output, mean ‖ log-variance [B, f, h, w, 2·z_dim], log-variance not yet clipped
        (the official Wan trainer normalises these moments before it builds the posterior, spec §8.9)."""
        return self._run(self.encoder, ENCODER_CHUNK, video.astype(self.config.dtype), encoding=True)

    def decode(self, z: Array) -> Array:
        """latents [B, f, h, w, z_dim] (denormalised) -> video in [-1, 1]."""
        out = self._run(self.decoder, DECODER_CHUNK, z.astype(self.config.dtype), encoding=False)
        return jnp.clip(out, -1.0, 1.0)


def init_params(cfg: VAEConfig, rng: Array) -> dict:
    """Randomly initialised parameters; under `jax.eval_shape` this gives the tree's shapes at no cost."""
    side = cfg.spatial_compression
    video = jnp.zeros((1, 1 + ENCODER_CHUNK, side, side, cfg.in_channels), cfg.dtype)
    return AutoencoderKLWan(cfg).init(rng, video)["params"]
