"""diffusers `AutoencoderKLWan` safetensors -> vapjax Wan VAE checkpoint.

The rules walk the architecture the config describes (one rule per parameter of our tree), so a key the
checkpoint lacks is reported by name, and `check` rejects any key no rule consumes.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from convert.core import Path, Rule, assemble, check, conv_as_linear, conv_kernel, flatten_leading, storage_dtype
from convert.errors import ConversionError
from convert.source import TensorSource, read_config
from vapjax import checkpoint
from vapjax.models.wan_vae import VAEConfig, init_params
from vapjax.tree import flatten as flatten_tree



def _conv(src: str, dst: Path, spatial_dims: int = 3) -> list[Rule]:
    return [Rule(f"{src}.weight", dst + ("kernel",), transform=conv_kernel(spatial_dims)),
            Rule(f"{src}.bias", dst + ("bias",))]


def _pointwise(src: str, dst: Path, spatial_dims: int) -> list[Rule]:
    """A 1x1(x1) Conv{2,3}d as our Dense."""
    return [Rule(f"{src}.weight", dst + ("kernel",), transform=conv_as_linear(spatial_dims)),
            Rule(f"{src}.bias", dst + ("bias",))]


def _norm(src: str, dst: Path, images: bool = False) -> list[Rule]:
    # gamma is stored broadcastable: [C, 1, 1, 1] (video) or [C, 1, 1] (the attention's per-frame images).
    return [Rule(f"{src}.gamma", dst + ("scale",), transform=flatten_leading(3 if images else 4))]


def _resnet(src: str, dst: Path, in_ch: int, out_ch: int) -> list[Rule]:
    out = (_norm(f"{src}.norm1", dst + ("norm1",)) + _conv(f"{src}.conv1", dst + ("conv1",))
           + _norm(f"{src}.norm2", dst + ("norm2",)) + _conv(f"{src}.conv2", dst + ("conv2",)))
    if in_ch != out_ch:
        out += _pointwise(f"{src}.conv_shortcut", dst + ("conv_shortcut",), 3)
    return out


def _resample(src: str, dst: Path, temporal: bool) -> list[Rule]:
    out = _conv(f"{src}.resample.1", dst + ("conv",), spatial_dims=2)  # resample.0 is the pad / upsampler
    if temporal:
        out += _conv(f"{src}.time_conv", dst + ("time_conv",))
    return out


def _mid_block(src: str, dst: Path, width: int) -> list[Rule]:
    attn, attn_dst = f"{src}.attentions.0", dst + ("attentions_0",)
    return (_resnet(f"{src}.resnets.0", dst + ("resnets_0",), width, width)
            + _norm(f"{attn}.norm", attn_dst + ("norm",), images=True)
            + _pointwise(f"{attn}.to_qkv", attn_dst + ("to_qkv",), 2)
            + _pointwise(f"{attn}.proj", attn_dst + ("proj",), 2)
            + _resnet(f"{src}.resnets.1", dst + ("resnets_1",), width, width))


def rules(cfg: VAEConfig) -> list[Rule]:
    """One rule per parameter of `AutoencoderKLWan(cfg)`."""
    enc: Path = ("encoder",)
    out = _conv("encoder.conv_in", enc + ("conv_in",))
    widths, n, in_ch = cfg.encoder_widths, 0, cfg.base_dim
    for level, width in enumerate(widths):  # the reference's flat down_blocks list
        for _ in range(cfg.num_res_blocks):
            out += _resnet(f"encoder.down_blocks.{n}", enc + (f"down_blocks_{n}",), in_ch, width)
            in_ch, n = width, n + 1
        if level < len(widths) - 1:
            out += _resample(f"encoder.down_blocks.{n}", enc + (f"down_blocks_{n}",), cfg.temporal_downsample[level])
            n += 1
    out += _mid_block("encoder.mid_block", enc + ("mid_block",), widths[-1])
    out += _norm("encoder.norm_out", enc + ("norm_out",)) + _conv("encoder.conv_out", enc + ("conv_out",))
    out += _pointwise("quant_conv", enc + ("quant_conv",), 3)

    dec: Path = ("decoder",)
    widths, temporal = cfg.decoder_widths, cfg.temporal_downsample[::-1]
    out += _pointwise("post_quant_conv", dec + ("post_quant_conv",), 3)
    out += _conv("decoder.conv_in", dec + ("conv_in",))
    out += _mid_block("decoder.mid_block", dec + ("mid_block",), widths[0])
    in_ch = widths[0]
    for level, width in enumerate(widths):
        src, dst = f"decoder.up_blocks.{level}", dec + (f"up_blocks_{level}",)
        for j in range(cfg.num_res_blocks + 1):
            out += _resnet(f"{src}.resnets.{j}", dst + (f"resnets_{j}",), in_ch, width)
            in_ch = width
        if level < len(widths) - 1:  # the upsampler halves the channels
            out += _resample(f"{src}.upsamplers.0", dst + ("upsample",), temporal[level])
            in_ch = width // 2
    out += _norm("decoder.norm_out", dec + ("norm_out",)) + _conv("decoder.conv_out", dec + ("conv_out",))
    return out


def target_shapes(cfg: VAEConfig) -> dict[Path, tuple[int, ...]]:
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return {path: tuple(leaf.shape) for path, leaf in flatten_tree(params).items()}


def read_diffusers_config(src_dir: str) -> VAEConfig:
    path = os.path.join(src_dir, "config.json")
    config = read_config(src_dir)
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ConversionError(f"{path}: a {config['_class_name']}, not an AutoencoderKLWan")
    try:
        return VAEConfig.from_diffusers(config)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from None


def convert_vae(src_dir: str, dst_dir: str, dtype: Any = None, check_only: bool = False) -> VAEConfig:
    """Convert a diffusers Wan VAE folder (config.json + safetensors) into a vapjax checkpoint at `dst_dir`.
    `dtype` (e.g. "bfloat16") stores the parameters in that dtype and records it as `param_dtype`."""
    cfg = read_diffusers_config(src_dir)
    source = TensorSource.open(src_dir)
    plan, shapes = rules(cfg), target_shapes(cfg)
    check(source.shapes(), plan, shapes, what=f"Wan VAE {src_dir}")
    if check_only:  # a pipeline checks every component's files before writing any
        return cfg
    dtype = storage_dtype(map(source.dtype, source.keys()), dtype)
    cfg = dataclasses.replace(cfg, dtype=dtype.name, param_dtype=dtype.name)
    params = assemble(source.load, plan, shapes, dtype=dtype)
    checkpoint.save(dst_dir, params, cfg)
    return cfg

