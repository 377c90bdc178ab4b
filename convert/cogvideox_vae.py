"""diffusers `AutoencoderKLCogVideoX` safetensors -> vapjax CogVideoX VAE checkpoint.

The rules walk the architecture the config describes (one rule per parameter of our tree), so a key the
checkpoint lacks is reported by name, and `check` rejects any key no rule consumes.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from convert.core import Path, Rule, assemble, check, conv_kernel, storage_dtype
from convert.errors import ConversionError
from convert.source import TensorSource, read_config
from vapjax import checkpoint
from vapjax.models.cogvideox_vae import VAEConfig, init_params
from vapjax.tree import flatten as flatten_tree
_RESAMPLERS = {"downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv"}


def _conv(src: str, dst: Path, spatial_dims: int = 3) -> list[Rule]:
    return [Rule(f"{src}.weight", dst + ("kernel",), transform=conv_kernel(spatial_dims)),
            Rule(f"{src}.bias", dst + ("bias",))]


def _group_norm(src: str, dst: Path) -> list[Rule]:
    return [Rule(f"{src}.weight", dst + ("scale",)), Rule(f"{src}.bias", dst + ("bias",))]


def _spatial_norm(src: str, dst: Path) -> list[Rule]:
    return (_group_norm(f"{src}.norm_layer", dst + ("norm_layer",))
            + _conv(f"{src}.conv_y.conv", dst + ("conv_y",)) + _conv(f"{src}.conv_b.conv", dst + ("conv_b",)))


def _resnet(src: str, dst: Path, in_ch: int, out_ch: int, decoder: bool) -> list[Rule]:
    norm = _spatial_norm if decoder else _group_norm
    out = (norm(f"{src}.norm1", dst + ("norm1",)) + _conv(f"{src}.conv1.conv", dst + ("conv1",))
           + norm(f"{src}.norm2", dst + ("norm2",)) + _conv(f"{src}.conv2.conv", dst + ("conv2",)))
    if in_ch != out_ch:  # a plain 1x1x1 Conv3d, hence no ".conv"
        out += _conv(f"{src}.conv_shortcut", dst + ("conv_shortcut",))
    return out


def _stage(src: str, dst: Path, in_ch: int, out_ch: int, num_resnets: int, decoder: bool,
           resampler: str | None) -> list[Rule]:
    out = []
    for j in range(num_resnets):
        out += _resnet(f"{src}.resnets.{j}", dst + (f"resnets_{j}",), in_ch if j == 0 else out_ch, out_ch, decoder)
    if resampler is not None:  # a per-frame Conv2d
        out += _conv(f"{src}.{_RESAMPLERS[resampler]}", dst + (resampler, "conv"), spatial_dims=2)
    return out


def rules(cfg: VAEConfig) -> list[Rule]:
    """One rule per parameter of `AutoencoderKLCogVideoX(cfg)`."""
    widths, last = cfg.block_out_channels, cfg.num_downsamples  # a block's input width is its predecessor's
    enc: Path = ("encoder",)
    out = _conv("encoder.conv_in.conv", enc + ("conv_in",))
    for i, width in enumerate(widths):
        out += _stage(f"encoder.down_blocks.{i}", enc + (f"down_blocks_{i}",), widths[max(i - 1, 0)], width,
                      cfg.layers_per_block, decoder=False, resampler="downsample" if i < last else None)
    out += _stage("encoder.mid_block", enc + ("mid_block",), widths[-1], widths[-1], 2, decoder=False, resampler=None)
    out += _group_norm("encoder.norm_out", enc + ("norm_out",)) + _conv("encoder.conv_out.conv", enc + ("conv_out",))

    dec: Path = ("decoder",)
    widths = widths[::-1]
    out += _conv("decoder.conv_in.conv", dec + ("conv_in",))
    out += _stage("decoder.mid_block", dec + ("mid_block",), widths[0], widths[0], 2, decoder=True, resampler=None)
    for i, width in enumerate(widths):
        out += _stage(f"decoder.up_blocks.{i}", dec + (f"up_blocks_{i}",), widths[max(i - 1, 0)], width,
                      cfg.layers_per_block + 1, decoder=True, resampler="upsample" if i < last else None)
    out += _spatial_norm("decoder.norm_out", dec + ("norm_out",)) + _conv("decoder.conv_out.conv", dec + ("conv_out",))
    return out


def target_shapes(cfg: VAEConfig) -> dict[Path, tuple[int, ...]]:
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return {path: tuple(leaf.shape) for path, leaf in flatten_tree(params).items()}


def read_diffusers_config(src_dir: str) -> VAEConfig:
    path = os.path.join(src_dir, "config.json")
    config = read_config(src_dir)
    if config.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
        raise ConversionError(f"{path}: a {config['_class_name']}, not an AutoencoderKLCogVideoX")
    try:
        return VAEConfig.from_diffusers(config)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None


def convert_vae(src_dir: str, dst_dir: str, dtype: Any = None, check_only: bool = False) -> VAEConfig:
    """Convert a diffusers VAE folder (config.json + safetensors) into a vapjax checkpoint at `dst_dir`.
    `dtype` (default: bf16 for a bf16 checkpoint, else fp32) is the stored dtype, recorded as the
    config's `dtype` and `param_dtype`."""
    cfg = read_diffusers_config(src_dir)
    source = TensorSource.open(src_dir)
    plan, shapes = rules(cfg), target_shapes(cfg)
    check(source.shapes(), plan, shapes, what=f"CogVideoX VAE {src_dir}")
    if check_only:  # a pipeline checks every component's files before writing any
        return cfg
    dtype = storage_dtype(map(source.dtype, source.keys()), dtype)
    cfg = dataclasses.replace(cfg, dtype=dtype.name, param_dtype=dtype.name)
    params = assemble(source.load, plan, shapes, dtype=dtype)
    checkpoint.save(dst_dir, params, cfg)
    return cfg
