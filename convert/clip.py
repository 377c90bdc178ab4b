"""transformers `CLIPVisionModel` / `CLIPVisionModelWithProjection` safetensors -> vapjax `clip_vision` checkpoint.

Source keys (per layer i). V is `vision_model.`, the prefix every file has except a CLIPVisionModel
saved by transformers >= 5, whose keys start at `embeddings.` / `encoder.` (V = ""):

    V.embeddings.patch_embedding.weight [D, C, p, p]       -> patch_embed/kernel [C*p*p, D]
    V.embeddings.class_embedding                           -> class_embedding
    V.embeddings.position_embedding.weight                 -> position_embedding
    V.pre_layrnorm.{weight,bias}                           -> pre_norm/{scale,bias}
    V.encoder.layers.{i}.layer_norm1.{weight,bias}         -> blocks/attention_norm/{scale,bias}[i]
    V.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*      -> blocks/attention/{q,k,v,o}/{kernel,bias}[i]
    V.encoder.layers.{i}.layer_norm2.{weight,bias}         -> blocks/ffn_norm/{scale,bias}[i]
    V.encoder.layers.{i}.mlp.{fc1,fc2}.{weight,bias}       -> blocks/ffn/{fc1,fc2}/{kernel,bias}[i]
    V.post_layernorm.{weight,bias}                         -> post_norm/{scale,bias}
    visual_projection.weight                               -> projection/kernel  (WithProjection only)

Files written by transformers < 4.31 also hold the buffer `V.embeddings.position_ids`; it must be
arange(num_tokens) and is then consumed. Every weight is converted, the last layer and post_norm
included, although Wan reads only the penultimate hidden states.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from convert.core import LINEAR, Rule, assemble, check, conv_as_linear, storage_dtype
from convert.errors import ConversionError
from convert.source import TensorSource, read_config
from vapjax import checkpoint
from vapjax.models.clip import CLIPVisionConfig, CLIPVisionEncoder
from vapjax.tree import flatten as flatten_tree

ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
VISION = "vision_model."
POSITION_IDS = "embeddings.position_ids"


def rules(cfg: CLIPVisionConfig, prefix: str = VISION) -> list[Rule]:
    def norm(src, dst, i=None):
        return [Rule(f"{src}.weight", dst + ("scale",), i), Rule(f"{src}.bias", dst + ("bias",), i)]

    def linear(src, dst, i=None):
        return [Rule(f"{src}.weight", dst + ("kernel",), i, LINEAR), Rule(f"{src}.bias", dst + ("bias",), i)]

    out = [Rule(prefix + "embeddings.patch_embedding.weight", ("patch_embed", "kernel"), transform=conv_as_linear(2)),
           Rule(prefix + "embeddings.class_embedding", ("class_embedding",)),
           Rule(prefix + "embeddings.position_embedding.weight", ("position_embedding",)),
           *norm(prefix + "pre_layrnorm", ("pre_norm",)),
           *norm(prefix + "post_layernorm", ("post_norm",))]
    if cfg.projection_dim:
        out.append(Rule("visual_projection.weight", ("projection", "kernel"), transform=LINEAR))
    for i in range(cfg.num_layers):
        pre = f"{prefix}encoder.layers.{i}"
        out += norm(f"{pre}.layer_norm1", ("blocks", "attention_norm"), i)
        out += norm(f"{pre}.layer_norm2", ("blocks", "ffn_norm"), i)
        for src, dst in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
            out += linear(f"{pre}.self_attn.{src}", ("blocks", "attention", dst), i)
        out += linear(f"{pre}.mlp.fc1", ("blocks", "ffn", "fc1"), i)
        out += linear(f"{pre}.mlp.fc2", ("blocks", "ffn", "fc2"), i)
    return out


def target_shapes(cfg: CLIPVisionConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    pixels = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    model = CLIPVisionEncoder(cfg)
    variables = jax.eval_shape(lambda r, x: model.init(r, x, method=model.init_all), jax.random.key(0), pixels)
    return {path: tuple(a.shape) for path, a in flatten_tree(variables["params"]).items()}


def read_transformers_config(src_dir: str) -> CLIPVisionConfig:
    path = os.path.join(src_dir, "config.json")
    hf = read_config(src_dir)
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{path}: architecture {arch!r} is not a CLIP vision tower ({', '.join(ARCHITECTURES)})")
    try:
        return CLIPVisionConfig.from_transformers(hf, with_projection=arch == "CLIPVisionModelWithProjection")
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from None


def key_prefix(shapes: dict) -> str:
    """`vision_model.`, or "" for a transformers >= 5 CLIPVisionModel (no key has the prefix)."""
    return VISION if any(k.startswith(VISION) for k in shapes) else ""


def _consume_position_ids(src: TensorSource, shapes: dict, cfg: CLIPVisionConfig, key: str, what: str) -> None:
    """Drop the old persistent `position_ids` buffer from `shapes` once it is checked to be the identity."""
    if key not in shapes:
        return
    ids = src.load(key) if int(np.prod(shapes.pop(key))) == cfg.num_tokens else None
    if ids is None or not np.array_equal(ids.reshape(-1), np.arange(cfg.num_tokens)):
        raise ConversionError(f"{what}: {key} is not arange({cfg.num_tokens})")


def convert_clip(src_dir: str, dst_dir: str, dtype=None, check_only: bool = False) -> CLIPVisionConfig:
    """Convert a transformers CLIP vision folder (config.json + model.safetensors[.index.json]).

    `dtype` is the stored parameter dtype, recorded as `param_dtype` and as the compute `dtype`.
    None: a bfloat16 checkpoint stays bfloat16, anything else becomes float32.
    """
    cfg = read_transformers_config(src_dir)
    src = TensorSource.open(src_dir, stem="model")
    shapes = src.shapes()
    prefix = key_prefix(shapes)
    _consume_position_ids(src, shapes, cfg, prefix + POSITION_IDS, src_dir)
    plan, targets = rules(cfg, prefix), target_shapes(cfg)
    check(shapes, plan, targets, what=src_dir)
    if check_only:  # a pipeline checks every component's files before writing any
        return cfg
    dtype = storage_dtype(map(src.dtype, src.keys()), dtype)
    cfg = dataclasses.replace(cfg, dtype=dtype.name, param_dtype=dtype.name)
    params = assemble(src.load, plan, targets, dtype=dtype)
    checkpoint.save(dst_dir, params, cfg)
    return cfg

