"""T5 v1.1 / UMT5 text encoder (the encoder stack only) in Flax linen.

CogVideoX encodes prompts with the T5 v1.1 XXL encoder, Wan with UMT5-XXL. Both are pre-norm
transformer encoders with:

* RMS normalisation (T5's "layer norm"): no mean subtraction, no bias, statistics in float32;
* self-attention *without* the 1/sqrt(d) logit scale and with a learned relative-position bias
  added to the logits. Relative distances are binned into buckets (exact for short distances,
  logarithmic up to `relative_attention_max_distance`, separate buckets for each direction);
  T5 owns one bias table (in layer 0) shared by every layer, UMT5 one table per layer
  (`per_layer_position_bias`);
* a gated feed-forward `wo(act(wi_0 x) * wi_1 x)` (T5 v1.1, UMT5: act = tanh-approximated GELU),
  or the original T5's plain `wo(act(wi x))` (`feed_forward_proj="relu"`);
* a final RMS norm.

The layers are one `nn.scan` over a single block, so every per-layer parameter is stacked on a
leading `num_layers` axis (one compiled block for the 24-layer XXL encoder). Parameter tree:

    embed_tokens/embedding                      [vocab, d_model]
    relative_attention_bias/embedding           [buckets, heads]          (T5 only: shared)
    blocks/relative_attention_bias/embedding    [layers, buckets, heads]  (UMT5 only: per layer)
    blocks/attention_norm/scale                 [layers, d_model]
    blocks/attention/{q,k,v}/kernel             [layers, d_model, heads*d_kv]
    blocks/attention/o/kernel                   [layers, heads*d_kv, d_model]
    blocks/ffn_norm/scale                       [layers, d_model]
    blocks/ffn/{wi_0,wi_1}/kernel or wi/kernel  [layers, d_model, d_ff]
    blocks/ffn/wo/kernel                        [layers, d_ff, d_model]
    final_norm/scale                            [d_model]

Precision: parameters are stored in `param_dtype` and every activation (residual stream included)
is carried in `dtype`, as transformers does for a model loaded in that dtype. Norm statistics are
float32 and so are the attention logits and softmax (`jax.nn.dot_product_attention`). transformers
keeps the FFN output projection `wo` in float32 only for float16 models (`_keep_in_fp32_modules`,
an fp16 overflow guard, together with its inf clamping); bfloat16 has float32's range, so here
`wo` runs in `dtype` like every other layer and no clamping is done.

The attention mask is optional: CogVideoX encodes its fixed-length padded prompts without one (the
pad positions attend and are attended to; their outputs are kept), Wan passes one.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),  # tanh approximation
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Encoder hyper-parameters. Defaults: the T5 v1.1 XXL encoder of CogVideoX."""
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"   # "[gated-]{relu,gelu,gelu_new,silu}", as in transformers
    per_layer_position_bias: bool = False   # UMT5: every layer has its own relative-bias table
    dtype: str = "float32"                  # activations
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: unsupported activation "
                             f"(expected [gated-]{{{', '.join(_ACTIVATIONS)}}})")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers maps "gated-gelu" (the T5 v1.1 name) to the tanh approximation.
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.removeprefix("gated-")

    @classmethod
    def from_transformers(cls, hf: dict) -> "T5Config":
        """From a transformers `config.json` of a T5 / UMT5 (encoder) model."""
        model_type = hf.get("model_type")
        if model_type not in ("t5", "umt5"):
            raise ValueError(f"model_type {model_type!r}: not a T5 or UMT5 config")
        return cls(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
            num_layers=hf["num_layers"], num_heads=hf["num_heads"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=hf.get("feed_forward_proj", "relu" if model_type == "t5" else "gated-gelu"),
            per_layer_position_bias=model_type == "umt5",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        return cls(**d)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional relative-position bucket of every (query i, key j) pair, int32 [length, length].

    Half of the buckets are for keys after the query (j > i), half for the rest. Within a half,
    distances below `num_buckets // 4` get a bucket each; larger ones share logarithmically wider
    buckets up to `max_distance`, beyond which they all fall in the last bucket. Computed on the
    host in float32, which reproduces transformers' bucket boundaries exactly.
    """
    half = num_buckets // 2
    exact = half // 2
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    dist = np.abs(rel)
    log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
    scaled = log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    far = np.minimum(exact + scaled.astype(np.int32), half - 1)
    return (np.where(rel > 0, half, 0) + np.where(dist < exact, dist, far)).astype(np.int32)


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * scale, statistics in float32."""
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class RelativePositionBias(nn.Module):
    """Bucket indices [T, T] -> attention logit bias [1, heads, T, T]."""
    config: T5Config

    @nn.compact
    def __call__(self, buckets):
        cfg = self.config
        table = self.param("embedding", nn.initializers.normal(1.0),
                           (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.param_dtype)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]


class SelfAttention(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, position_bias, mask):
        cfg = self.config
        dense = partial(nn.Dense, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        inner = cfg.num_heads * cfg.d_kv
        q, k, v = (dense(inner, name=n)(x).reshape(*x.shape[:-1], cfg.num_heads, cfg.d_kv)
                   for n in ("q", "k", "v"))
        out = jax.nn.dot_product_attention(q, k, v, bias=position_bias.astype(q.dtype), mask=mask, scale=1.0)
        return dense(cfg.d_model, name="o")(out.reshape(*x.shape[:-1], inner))


class FeedForward(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = partial(nn.Dense, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        act = _ACTIVATIONS[cfg.activation]
        if cfg.gated:
            h = act(dense(cfg.d_ff, name="wi_0")(x)) * dense(cfg.d_ff, name="wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, name="wi")(x))
        return dense(cfg.d_model, name="wo")(h)


class T5Block(nn.Module):
    """One pre-norm encoder layer. `position_bias` is the shared T5 bias [1, H, T, T], or None for
    UMT5, where the layer computes its own from the bucket indices `buckets` [T, T]."""
    config: T5Config

    @nn.compact
    def __call__(self, x, position_bias, buckets, mask):
        cfg = self.config
        norm = partial(RMSNorm, cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype)
        if cfg.per_layer_position_bias:
            position_bias = RelativePositionBias(cfg, name="relative_attention_bias")(buckets)
        x = x + SelfAttention(cfg, name="attention")(norm(name="attention_norm")(x), position_bias, mask)
        x = x + FeedForward(cfg, name="ffn")(norm(name="ffn_norm")(x))
        return x, None


class T5Encoder(nn.Module):
    """input_ids int [B, T] (and optionally attention_mask [B, T], nonzero = attend) ->
    last hidden state [B, T, d_model] in `config.dtype`."""
    config: T5Config

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     name="embed_tokens")(input_ids)
        buckets = relative_position_buckets(input_ids.shape[-1], cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        position_bias = (None if cfg.per_layer_position_bias
                         else RelativePositionBias(cfg, name="relative_attention_bias")(buckets))
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        blocks = nn.scan(T5Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers)
        x, _ = blocks(cfg, name="blocks")(x, position_bias, buckets, mask)
        return RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="final_norm")(x)


def init_params(cfg: T5Config, rng) -> dict:
    """Randomly initialised parameters (for tests and random-weight demos)."""
    return T5Encoder(cfg).init(rng, jnp.zeros((1, 2), jnp.int32))["params"]
