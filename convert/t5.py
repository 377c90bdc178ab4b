"""transformers `T5EncoderModel` / `UMT5EncoderModel` safetensors -> vapjax `t5_encoder` checkpoint.

Source keys (per layer i; `layer.0` is attention, `layer.1` the feed-forward):

    shared.weight                                              -> embed_tokens/embedding
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                          T5:   -> relative_attention_bias/embedding (shared)
    encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight
                                          UMT5: -> blocks/relative_attention_bias/embedding[i]
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight  -> blocks/attention/{q,k,v,o}/kernel[i]
    encoder.block.{i}.layer.0.layer_norm.weight                -> blocks/attention_norm/scale[i]
    encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight (gated) or {wi,wo}.weight
                                                               -> blocks/ffn/*/kernel[i]
    encoder.block.{i}.layer.1.layer_norm.weight                -> blocks/ffn_norm/scale[i]
    encoder.final_layer_norm.weight                            -> final_norm/scale

The input embedding is tied: a file may hold `shared.weight`, its copy `encoder.embed_tokens.weight`,
or both (then they must be equal, and the copy counts as consumed).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from convert.core import LINEAR, Rule, assemble, check, storage_dtype
from convert.errors import ConversionError
from convert.source import TensorSource, read_config
from vapjax import checkpoint
from vapjax.models.t5 import T5Config, T5Encoder
from vapjax.tree import flatten as flatten_tree
EMBED = "shared.weight"
TIED_EMBED = "encoder.embed_tokens.weight"


def rules(cfg: T5Config) -> list[Rule]:
    out = [Rule(EMBED, ("embed_tokens", "embedding")),
           Rule("encoder.final_layer_norm.weight", ("final_norm", "scale"))]
    bias_key = "layer.0.SelfAttention.relative_attention_bias.weight"
    if not cfg.per_layer_position_bias:
        out.append(Rule(f"encoder.block.0.{bias_key}", ("relative_attention_bias", "embedding")))
    ffn = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
    for i in range(cfg.num_layers):
        pre = f"encoder.block.{i}"
        if cfg.per_layer_position_bias:
            out.append(Rule(f"{pre}.{bias_key}", ("blocks", "relative_attention_bias", "embedding"), i))
        out += [Rule(f"{pre}.layer.0.SelfAttention.{n}.weight", ("blocks", "attention", n, "kernel"), i, LINEAR)
                for n in ("q", "k", "v", "o")]
        out += [Rule(f"{pre}.layer.1.DenseReluDense.{n}.weight", ("blocks", "ffn", n, "kernel"), i, LINEAR)
                for n in ffn]
        out += [Rule(f"{pre}.layer.0.layer_norm.weight", ("blocks", "attention_norm", "scale"), i),
                Rule(f"{pre}.layer.1.layer_norm.weight", ("blocks", "ffn_norm", "scale"), i)]
    return out


def target_shapes(cfg: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(T5Encoder(cfg).init, jax.random.key(0), ids)
    return {path: tuple(a.shape) for path, a in flatten_tree(variables["params"]).items()}


def _embedding_alias(src: TensorSource, shapes: dict, what: str) -> dict[str, str]:
    """Resolve the tied input embedding in place in `shapes`; returns {rule key: file key}."""
    if TIED_EMBED not in shapes:
        return {}
    tied_shape = shapes.pop(TIED_EMBED)
    if EMBED not in shapes:
        shapes[EMBED] = tied_shape
        return {EMBED: TIED_EMBED}
    if tied_shape != shapes[EMBED] or not np.array_equal(src.load(TIED_EMBED), src.load(EMBED)):
        raise ConversionError(f"{what}: {TIED_EMBED} differs from {EMBED}: the input embedding must be tied")
    return {}


def read_transformers_config(src_dir: str) -> T5Config:
    path = os.path.join(src_dir, "config.json")
    hf = read_config(src_dir)
    try:
        return T5Config.from_transformers(hf)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from None


def convert_t5(src_dir: str, dst_dir: str, dtype=None, check_only: bool = False) -> T5Config:
    """Convert a transformers T5/UMT5 encoder folder (config.json + model.safetensors[.index.json]).

    `dtype` is the stored parameter dtype, recorded in the saved config as `param_dtype` and as the
    compute `dtype`. None: a bfloat16 checkpoint stays bfloat16, anything else becomes float32
    (float16 included: T5 activations overflow float16).
    """
    cfg = read_transformers_config(src_dir)
    src = TensorSource.open(src_dir, stem="model")
    shapes = src.shapes()
    alias = _embedding_alias(src, shapes, src_dir)
    plan, targets = rules(cfg), target_shapes(cfg)
    check(shapes, plan, targets, what=src_dir)
    if check_only:  # a pipeline checks every component's files before writing any
        return cfg
    dtype = storage_dtype(map(src.dtype, src.keys()), dtype)
    cfg = dataclasses.replace(cfg, dtype=dtype.name, param_dtype=dtype.name)
    params = assemble(lambda k: src.load(alias.get(k, k)), plan, targets, dtype=dtype)
    checkpoint.save(dst_dir, params, cfg)
    return cfg
