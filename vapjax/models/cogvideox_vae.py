"""CogVideoX 3D causal VAE (diffusers `AutoencoderKLCogVideoX`) in Flax linen, channels-last.

Videos are [B, F, H, W, C] with pixels in [-1, 1]; latents are [B, f, h, w, latent_channels]. With the
released config F = 4k + 1 frames map to f = k + 1 latent frames and 8x8 pixels to one latent pixel. The
scaling factor (0.7) lives in the config; the pipeline applies it, the VAE does not.

The reference's numerics are replicated, including the parts that change results:

- Time is processed in chunks: the encoder takes 8 frames at a time, the decoder 2 latent frames, and the
  remainder joins the first chunk (17 frames -> 9 + 8; 13 latent frames -> 3 + 2 + ... + 2). GroupNorm
  statistics are per chunk. Every 3x3x3 convolution is causal in time and carries its last two input frames
  (the conv cache) into the next chunk; the very first chunk instead repeats its first frame.
- A chunk with an odd frame count keeps its first frame apart when time is halved (encoder) or doubled
  (decoder), which is how 4k + 1 frames become k + 1 latents and back.
- Decoder norms are SpatialNorm3D: GroupNorm scaled and shifted by 1x1x1 convs of the chunk's latents,
  nearest-resized to the feature map (first latent frame to first frame alone when the count is odd).
- The reference's `CogVideoXSafeConv3d` splits huge inputs along time with a (kernel - 1) overlap, which is
  the same convolution; XLA needs no such split, so there is none here.

Optional spatial tiling (`Tiling`) reproduces `enable_tiling`: overlapping tiles processed separately and
linearly blended with their already-blended upper and left neighbours.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vapjax.models.vae_common import Posterior, cross_fade, each_tile  # noqa: F401 (Posterior: public here too)
from flax.linen.dtypes import promote_dtype

Array = jax.Array
Cache = Mapping[str, Any]  # nested like the modules; {} before the first chunk
Step = Callable[[Array, Cache], tuple[Array, Cache]]  # one chunk through the encoder or decoder

# diffusers config.json fields we read; the block types, activation and quant convs are checked, not stored.
_DIFFUSERS_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                     "norm_num_groups", "norm_eps", "temporal_compression_ratio", "sample_height", "sample_width",
                     "scaling_factor", "invert_scale_latents")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of the VAE; defaults are CogVideoX-5B(-I2V)'s. `dtype` is the compute dtype."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 0.7
    invert_scale_latents: bool = False
    num_sample_frames_batch_size: int = 8   # encoder chunk length (frames)
    num_latent_frames_batch_size: int = 2   # decoder chunk length (latent frames)
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    @property
    def num_downsamples(self) -> int:
        return len(self.block_out_channels) - 1

    @property
    def time_levels(self) -> int:
        """How many of the first down/up blocks also halve/double time."""
        return int(math.log2(self.temporal_compression_ratio))

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides) -> "VAEConfig":
        """From a diffusers `AutoencoderKLCogVideoX` config.json; `overrides` sets e.g. dtype."""
        n = len(config.get("block_out_channels", cls.block_out_channels))
        expected = {"down_block_types": ["CogVideoXDownBlock3D"] * n, "up_block_types": ["CogVideoXUpBlock3D"] * n,
                    "act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False}
        for key, want in expected.items():
            if key in config and (list(config[key]) if isinstance(want, list) else config[key]) != want:
                raise ValueError(f"CogVideoX VAE config: unsupported {key}={config[key]!r} (expected {want!r})")
        return cls(**{k: config[k] for k in _DIFFUSERS_FIELDS if k in config}, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Spatial tiling as diffusers' `enable_tiling`: tile size in pixels and overlap fractions."""
    sample_height: int
    sample_width: int
    overlap_height: float = 1 / 6
    overlap_width: float = 1 / 5

    @classmethod
    def default(cls, cfg: VAEConfig) -> "Tiling":
        """The reference's default: half the training resolution (240x360 tiles for 480x720)."""
        return cls(cfg.sample_height // 2, cfg.sample_width // 2)


# ----------------------------------------------------------------------------------------------------------
# Layers


def _group_norm(cfg: VAEConfig, eps: float, name: str) -> nn.GroupNorm:
    # Statistics in float32 (flax promotes), two-pass variance like torch.
    return nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=eps, use_fast_variance=False,
                        dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def _conv(cfg: VAEConfig, features: int, kernel: tuple[int, ...], name: str, **kw) -> nn.Conv:
    return nn.Conv(features, kernel, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name, **kw)


class CausalConv3d(nn.Module):
    """3x3x3 convolution, causal in time (output frame t sees inputs t-2..t), space zero-padded by one.

    The two frames before a chunk come from `cache` (the previous chunk's last two padded inputs), or repeat
    the chunk's first frame at the start of the video. Returns (output, cache for the next chunk).
    """
    cfg: VAEConfig
    features: int

    @nn.compact
    def __call__(self, x: Array, cache: Array | None) -> tuple[Array, Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 3, x.shape[-1], self.features),
                            self.cfg.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.cfg.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.cfg.dtype)
        past = jnp.repeat(x[:, :1], 2, axis=1) if cache is None else cache
        x = jnp.concatenate([past, x], axis=1)
        y = jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1, 1), padding=((0, 0), (1, 1), (1, 1)),
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + bias, x[:, -2:]


def _nearest_frames(x: Array, frames: int) -> Array:
    """torch `interpolate(mode='nearest')` along time: output frame i reads floor(i * in / out)."""
    return jnp.take(x, np.arange(frames) * x.shape[1] // frames, axis=1)


def _resize_latents(zq: Array, like: Array) -> Array:
    """Nearest-resize decoder conditioning to `like`'s frames and pixels. With an odd frame count > 1 the first
    latent frame maps to the first frame alone and the rest to the rest, mirroring the causal time upsampling."""
    frames = like.shape[1]
    if frames > 1 and frames % 2:
        zq = jnp.concatenate([zq[:, :1], _nearest_frames(zq[:, 1:], frames - 1)], axis=1)
    else:
        zq = _nearest_frames(zq, frames)
    zq = jnp.repeat(zq, like.shape[2] // zq.shape[2], axis=2)
    return jnp.repeat(zq, like.shape[3] // zq.shape[3], axis=3)


class SpatialNorm3D(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq being the decoded chunk's latents (arXiv:2209.09002)."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, f: Array, zq: Array) -> Array:
        features = f.shape[-1]
        # The 1x1x1 convs run at latent resolution: a pointwise conv commutes with nearest resizing exactly.
        scale = _resize_latents(_conv(self.cfg, features, (1, 1, 1), "conv_y")(zq), f)
        shift = _resize_latents(_conv(self.cfg, features, (1, 1, 1), "conv_b")(zq), f)
        return _group_norm(self.cfg, 1e-6, "norm_layer")(f) * scale + shift  # eps fixed, not norm_eps


class ResnetBlock3D(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1-projected when channels change) skip.
    Norms are GroupNorm in the encoder and SpatialNorm3D on `zq` in the decoder."""
    cfg: VAEConfig
    features: int

    @nn.compact
    def __call__(self, x: Array, cache: Cache, zq: Array | None = None) -> tuple[Array, Cache]:
        def norm(h, name):
            if zq is None:
                return _group_norm(self.cfg, self.cfg.norm_eps, name)(h)
            return SpatialNorm3D(self.cfg, name=name)(h, zq)

        h, conv1 = CausalConv3d(self.cfg, self.features, name="conv1")(nn.silu(norm(x, "norm1")), cache.get("conv1"))
        h, conv2 = CausalConv3d(self.cfg, self.features, name="conv2")(nn.silu(norm(h, "norm2")), cache.get("conv2"))
        if x.shape[-1] != self.features:
            x = _conv(self.cfg, self.features, (1, 1, 1), "conv_shortcut")(x)
        return x + h, {"conv1": conv1, "conv2": conv2}


def _halve_frames(x: Array) -> Array:
    """Average consecutive frame pairs; an odd leading frame passes through alone."""
    odd = x.shape[1] % 2
    rest = x[:, odd:]
    return jnp.concatenate([x[:, :odd], (rest[:, 0::2] + rest[:, 1::2]) / 2], axis=1)


def _double_frames(x: Array) -> Array:
    """Repeat every frame twice; an odd leading frame stays single."""
    odd = x.shape[1] % 2
    return jnp.concatenate([x[:, :odd], jnp.repeat(x[:, odd:], 2, axis=1)], axis=1)


class Downsample3D(nn.Module):
    """Optional time halving, then a per-frame 3x3 stride-2 conv padded on the bottom/right only."""
    cfg: VAEConfig
    compress_time: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.compress_time:
            x = _halve_frames(x)
        return _conv(self.cfg, x.shape[-1], (3, 3), "conv", strides=2, padding=((0, 1), (0, 1)))(x)


class Upsample3D(nn.Module):
    """Nearest 2x in space (and time when compress_time), then a per-frame 3x3 conv."""
    cfg: VAEConfig
    compress_time: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        if self.compress_time:
            x = _double_frames(x)
        return _conv(self.cfg, x.shape[-1], (3, 3), "conv", padding=1)(x)


class Stage(nn.Module):
    """A CogVideoX down, mid or up block: resnets, then an optional resampler ("down" or "up")."""
    cfg: VAEConfig
    features: int
    num_resnets: int
    resample: str | None = None
    compress_time: bool = False

    @nn.compact
    def __call__(self, x: Array, cache: Cache, zq: Array | None = None) -> tuple[Array, Cache]:
        new = {}
        for j in range(self.num_resnets):
            name = f"resnets_{j}"
            x, new[name] = ResnetBlock3D(self.cfg, self.features, name=name)(x, cache.get(name, {}), zq)
        if self.resample == "down":
            x = Downsample3D(self.cfg, self.compress_time, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample3D(self.cfg, self.compress_time, name="upsample")(x)
        return x, new


class Encoder3D(nn.Module):
    """One chunk of video [B, F, H, W, in] -> posterior parameters [B, f, h, w, 2 * latent_channels]."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        cfg, widths = self.cfg, self.cfg.block_out_channels
        new = {}
        h, new["conv_in"] = CausalConv3d(cfg, widths[0], name="conv_in")(x, cache.get("conv_in"))
        for i, width in enumerate(widths):
            name = f"down_blocks_{i}"
            stage = Stage(cfg, width, cfg.layers_per_block, resample="down" if i < cfg.num_downsamples else None,
                          compress_time=i < cfg.time_levels, name=name)
            h, new[name] = stage(h, cache.get(name, {}))
        h, new["mid_block"] = Stage(cfg, widths[-1], 2, name="mid_block")(h, cache.get("mid_block", {}))
        h = nn.silu(_group_norm(cfg, 1e-6, "norm_out")(h))  # eps fixed, not norm_eps
        h, new["conv_out"] = CausalConv3d(cfg, 2 * cfg.latent_channels, name="conv_out")(h, cache.get("conv_out"))
        return h, new


class Decoder3D(nn.Module):
    """One chunk of latents [B, f, h, w, latent_channels] -> video [B, F, H, W, out]."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, z: Array, cache: Cache) -> tuple[Array, Cache]:
        cfg, widths = self.cfg, self.cfg.block_out_channels[::-1]
        new = {}
        h, new["conv_in"] = CausalConv3d(cfg, widths[0], name="conv_in")(z, cache.get("conv_in"))
        h, new["mid_block"] = Stage(cfg, widths[0], 2, name="mid_block")(h, cache.get("mid_block", {}), z)
        for i, width in enumerate(widths):
            name = f"up_blocks_{i}"
            stage = Stage(cfg, width, cfg.layers_per_block + 1, resample="up" if i < cfg.num_downsamples else None,
                          compress_time=i < cfg.time_levels, name=name)
            h, new[name] = stage(h, cache.get(name, {}), z)
        h = nn.silu(SpatialNorm3D(cfg, name="norm_out")(h, z))
        h, new["conv_out"] = CausalConv3d(cfg, cfg.out_channels, name="conv_out")(h, cache.get("conv_out"))
        return h, new


# ----------------------------------------------------------------------------------------------------------
# Chunking over time, tiling over space


def _in_time_chunks(step: Step, chunk: int, x: Array) -> Array:
    """Run `step` over `chunk`-frame pieces of x (the remainder joins the first), carrying the conv cache.
    The equal-sized later chunks go through one scanned step, so the program size does not grow with F."""
    batch, frames = x.shape[:2]
    count = max(frames // chunk, 1)
    first = frames - (count - 1) * chunk
    out, cache = step(x[:, :first], {})
    if count == 1:
        return out

    def body(cache, piece):
        out, cache = step(piece, cache)
        return cache, out

    rest = x[:, first:].reshape(batch, count - 1, chunk, *x.shape[2:]).swapaxes(0, 1)
    _, outs = jax.lax.scan(body, cache, rest)
    return jnp.concatenate([out, outs.swapaxes(0, 1).reshape(batch, -1, *outs.shape[3:])], axis=1)


def _tiled(step: Step, chunk: int, x: Array, size: tuple[int, int], stride: tuple[int, int],
           blend: tuple[int, int], keep: tuple[int, int]) -> Array:
    """Run `step` on `size` tiles of x [B, F, H, W, C] taken every `stride` pixels; blend each output tile with
    its already-blended upper and left neighbours over `blend` pixels and keep its top-left `keep` pixels."""
    height, width = x.shape[2:4]
    tops, lefts = range(0, height, stride[0]), range(0, width, stride[1])
    flat = each_tile(lambda t: _in_time_chunks(step, chunk, t), [x[:, :, i:i + size[0], j:j + size[1]] for i in tops for j in lefts])
    rows: list[list[Array]] = []
    for r in range(len(tops)):
        row: list[Array] = []
        for c in range(len(lefts)):
            tile = flat[r * len(lefts) + c]
            if rows:
                tile = cross_fade(rows[-1][c], tile, blend[0], axis=2)
            if row:
                tile = cross_fade(row[-1], tile, blend[1], axis=3)
            row.append(tile)
        rows.append(row)
    return jnp.concatenate([jnp.concatenate([t[:, :, :keep[0], :keep[1]] for t in row], axis=3) for row in rows],
                           axis=2)


class AutoencoderKLCogVideoX(nn.Module):
    """The VAE: `encode(video) -> Posterior`, `decode(latents) -> video` (not clamped).

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
        """Creates the parameters (`init`): one chunk through the encoder, its posterior mean through the decoder."""
        moments, _ = self.encoder(video, {})
        return self.decoder(moments[..., :self.config.latent_channels], {})[0]

    def _tile_plan(self, encoding: bool) -> tuple[tuple[int, int], ...]:
        """(tile size, stride, blend extent, kept size), each (height, width); the first two count input
        positions, the last two output positions (pixels or latents), rounded as the reference rounds them."""
        t, scale = self.tiling, 2 ** self.config.num_downsamples
        pixels = (t.sample_height, t.sample_width)
        latents = (int(pixels[0] / scale), int(pixels[1] / scale))
        overlap = (t.overlap_height, t.overlap_width)
        size, out = (pixels, latents) if encoding else (latents, pixels)
        stride = tuple(int(s * (1 - o)) for s, o in zip(size, overlap))
        blend = tuple(int(s * o) for s, o in zip(out, overlap))
        keep = tuple(s - b for s, b in zip(out, blend))
        return size, stride, blend, keep

    def _run(self, net: nn.Module, chunk: int, x: Array, encoding: bool) -> Array:
        """`net` over time chunks of x, in blended spatial tiles when tiling is on and x exceeds a tile."""
        # A pure function of the parameters, so that plain lax.scan / lax.map can loop over it (flax's
        # lifted nn.scan would trace the network twice per loop level).
        unbound, variables = net.unbind()

        def step(piece: Array, cache: Cache) -> tuple[Array, Cache]:
            return unbound.apply(variables, piece, cache)

        if self.tiling is not None:
            size, stride, blend, keep = self._tile_plan(encoding)
            if x.shape[2] > size[0] or x.shape[3] > size[1]:
                return _tiled(step, chunk, x, size, stride, blend, keep)
        return _in_time_chunks(step, chunk, x)

    def encode(self, video: Array) -> Posterior:
        """video [B, F, H, W, C] in [-1, 1] -> posterior over latents [B, f, h, w, latent_channels]."""
        h = self._run(self.encoder, self.config.num_sample_frames_batch_size, video.astype(self.config.dtype),
                      encoding=True)
        return Posterior.from_concat(h)

    def decode(self, z: Array) -> Array:
        """latents [B, f, h, w, latent_channels] (already divided by the scaling factor) -> video."""
        return self._run(self.decoder, self.config.num_latent_frames_batch_size, z.astype(self.config.dtype),
                         encoding=False)


def init_params(cfg: VAEConfig, rng: Array) -> dict:
    """Randomly initialised parameters; under `jax.eval_shape` this gives the tree's shapes at no cost."""
    side = 2 ** cfg.num_downsamples
    video = jnp.zeros((1, 1, side, side, cfg.in_channels), cfg.dtype)
    return AutoencoderKLCogVideoX(cfg).init(rng, video)["params"]
