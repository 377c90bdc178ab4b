"""CLIP vision tower (ViT) in Flax linen: the `image_encoder` of the Wan I2V pipelines.

Wan2.1-I2V conditions its transformer on the *penultimate* hidden states of CLIP ViT-H/14
(open_clip's XLM-RoBERTa-large/ViT-H-14 vision half, shipped as transformers' `CLIPVisionModel`):
`image_encoder(pixels, output_hidden_states=True).hidden_states[-2]`, i.e. the token sequence after
all layers but the last, *before* the final layer norm: [B, 257, 1280] for a 224x224 image.

The tower is a pre-norm ViT:

* patch embedding: a stride-`patch` convolution without bias (here a Dense over flattened patches),
  a learned class token prepended, a learned absolute position table added, then `pre_norm`
  (transformers' `pre_layrnorm`);
* `num_layers` blocks `x + attn(ln1(x))`, `x + mlp(ln2(x))`; attention has biased q/k/v/o
  projections and the usual 1/sqrt(head_dim) scale; the MLP is fc1 -> activation -> fc2
  (`gelu` = exact erf GELU for ViT-H/14, `quick_gelu` for OpenAI's ViTs);
* `post_norm` applies to the class token only (the pooled output), and `CLIPVisionModelWithProjection`
  adds a bias-free `projection` of it.

`__call__(pixels, layers=k)` runs the first k blocks, so `layers=num_layers - 1` is exactly Wan's
hidden_states[-2] and the last block is never computed. Blocks are one stacked parameter (leading
axis = layer) run by `lax.scan`, each step slicing its layer out of the stack. Parameter tree:

    patch_embed/kernel            [C*p*p, D]   (patches flattened in (C, p, p) order, as torch's conv weight)
    class_embedding               [D]
    position_embedding            [1 + (image_size // p)**2, D]
    pre_norm/{scale,bias}         [D]
    blocks/attention_norm/{scale,bias}, blocks/ffn_norm/{scale,bias}    [layers, D]
    blocks/attention/{q,k,v,o}/{kernel,bias}                            [layers, D, D], [layers, D]
    blocks/ffn/fc1/{kernel,bias}, blocks/ffn/fc2/{kernel,bias}          [layers, D, F], [layers, F], ...
    post_norm/{scale,bias}        [D]
    projection/kernel             [D, projection_dim]   (only with a projection)

Inputs are channels-last pixels [B, H, W, C] as `vapjax.clip_preprocess` makes them (H = W =
image_size). Precision: layer-norm statistics in float32; everything else in `dtype`.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from vapjax.models.cogvideox import LayerNorm  # float32 statistics, affine, output in the compute dtype

Array = jax.Array

_ACTIVATIONS = {
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Defaults: CLIP ViT-H/14, the Wan2.1-I2V image encoder."""
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    projection_dim: int | None = None   # CLIPVisionModelWithProjection: the pooled output's projection
    dtype: str = "float32"              # activations
    param_dtype: str = "float32"
    attention: str | None = None        # jax.nn.dot_product_attention implementation: None | "xla" | "cudnn"

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: unsupported (expected one of {', '.join(_ACTIVATIONS)})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid ** 2

    @classmethod
    def from_transformers(cls, hf: dict, with_projection: bool = False) -> "CLIPVisionConfig":
        """From a transformers `config.json` of a CLIPVisionModel[WithProjection]."""
        if hf.get("model_type") != "clip_vision_model":
            raise ValueError(f"model_type {hf.get('model_type')!r}: not a CLIP vision config")
        return cls(
            hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            patch_size=hf["patch_size"], image_size=hf["image_size"], num_channels=hf.get("num_channels", 3),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5), hidden_act=hf.get("hidden_act", "quick_gelu"),
            projection_dim=hf.get("projection_dim", 512) if with_projection else None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        return cls(**d)


def _dense(cfg: CLIPVisionConfig, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def _norm(cfg: CLIPVisionConfig, name: str) -> LayerNorm:
    return LayerNorm(cfg.layer_norm_eps, cfg.dtype, cfg.param_dtype, name=name)


class Attention(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        heads = lambda y: y.reshape(*y.shape[:-1], c.num_heads, c.head_dim)
        q, k, v = (heads(_dense(c, c.hidden_size, n)(x)) for n in ("q", "k", "v"))
        o = jax.nn.dot_product_attention(q, k, v, implementation=c.attention)  # scale 1/sqrt(head_dim)
        return _dense(c, c.hidden_size, "o")(o.reshape(*x.shape))


class MLP(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        return _dense(c, c.hidden_size, "fc2")(_ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "fc1")(x)))


class Block(nn.Module):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x + Attention(self.cfg, name="attention")(_norm(self.cfg, "attention_norm")(x))
        return x + MLP(self.cfg, name="ffn")(_norm(self.cfg, "ffn_norm")(x))


class CLIPVisionEncoder(nn.Module):
    """pixels [B, H, W, C] -> hidden states [B, 1 + grid**2, D] after the first `layers` blocks
    (default: all of them = transformers' last_hidden_state; `num_layers - 1` = Wan's image embeds).
    `pool(last_hidden)` is transformers' pooler_output, `project(pooled)` its image_embeds."""
    cfg: CLIPVisionConfig

    def setup(self):
        c = self.cfg
        self.patch_embed = _dense(c, c.hidden_size, "patch_embed", use_bias=False)
        self.class_embedding = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,),
                                          c.param_dtype)
        self.position_embedding = self.param("position_embedding", nn.initializers.normal(0.02),
                                             (c.num_tokens, c.hidden_size), c.param_dtype)
        self.pre_norm = _norm(c, "pre_norm")
        self.blocks = self.param("blocks", self._init_blocks)
        self.post_norm = _norm(c, "post_norm")
        if c.projection_dim:
            self.projection = _dense(c, c.projection_dim, "projection", use_bias=False)

    def _init_blocks(self, rng):
        x = jnp.zeros((1, 1, self.cfg.hidden_size), self.cfg.dtype)
        init = lambda r: Block(self.cfg, parent=None).init(r, x)["params"]
        return jax.vmap(init)(jax.random.split(rng, self.cfg.num_layers))

    def embed(self, pixels: Array) -> Array:
        c = self.cfg
        b, h, w, ch = pixels.shape
        if (h, w, ch) != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"CLIP vision: pixels must be [B, {c.image_size}, {c.image_size}, {c.num_channels}] "
                             f"(preprocessed), got {tuple(pixels.shape)}")
        g, p = c.grid, c.patch_size
        patches = pixels[:, :g * p, :g * p].astype(c.dtype).reshape(b, g, p, g, p, ch)
        patches = patches.transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, ch * p * p)  # torch conv order (C, p, p)
        cls = jnp.broadcast_to(self.class_embedding.astype(c.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, self.patch_embed(patches)], axis=1) + self.position_embedding.astype(c.dtype)
        return self.pre_norm(x)

    def __call__(self, pixels: Array, layers: int | None = None) -> Array:
        c = self.cfg
        layers = c.num_layers if layers is None else layers
        if not 0 <= layers <= c.num_layers:
            raise ValueError(f"CLIP vision: layers={layers} outside 0..{c.num_layers}")
        blocks = self.blocks

        def body(x, i):
            params = jax.tree.map(lambda a: a[i], blocks)
            return Block(c, parent=None).apply({"params": params}, x), None

        x, _ = jax.lax.scan(body, self.embed(pixels), jnp.arange(layers))
        return x

    def pool(self, last_hidden: Array) -> Array:
        return self.post_norm(last_hidden[:, 0])

    def project(self, pooled: Array) -> Array:
        if not self.cfg.projection_dim:
            raise ValueError("CLIP vision: this model has no projection (a CLIPVisionModel, not ...WithProjection)")
        return self.projection(pooled)

    def init_all(self, pixels: Array) -> Array:
        pooled = self.pool(self(pixels, layers=0))
        return self.project(pooled) if self.cfg.projection_dim else pooled


def image_embeds(cfg: CLIPVisionConfig, params: dict, pixels: Array) -> Array:
    """What Wan conditions on: the penultimate hidden states (transformers' hidden_states[-2]),
    [B, 1 + grid**2, D] in `cfg.dtype` (257 x 1280 for ViT-H/14 at 224)."""
    return _penultimate(cfg, params, jnp.asarray(pixels))


@partial(jax.jit, static_argnums=0)
def _penultimate(cfg, params, pixels):
    return CLIPVisionEncoder(cfg).apply({"params": params}, pixels, layers=cfg.num_layers - 1)


def init_params(cfg: CLIPVisionConfig, rng) -> dict:
    """Randomly initialised parameters (for tests and random-weight demos)."""
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), cfg.dtype)
    model = CLIPVisionEncoder(cfg)
    return jax.jit(lambda r: model.init(r, pixels, method=model.init_all)["params"])(rng)


def param_shapes(cfg: CLIPVisionConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))
