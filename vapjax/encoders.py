"""The frozen encoders, jitted: one wrapper per family for sampling and for the latent precompute /
on-the-fly training encoders, so inference and training encode alike. `Encoders`: CogVideoX's VAE and
T5; `WanEncoders`: Wan's VAE, UMT5 and CLIP vision tower.

Videos go in as uint8 frames [B, F, H, W, 3] (scaled to [-1, 1] as the pipeline's VideoProcessor);
latents come out channels-last, not yet × the VAE scaling factor. Captions are T5-encoded as
CogVideoX does: padded to L tokens, no attention mask, pads kept.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vapjax import checkpoint, text, video
from vapjax.clip_preprocess import CLIPPreprocessConfig
from vapjax.clip_preprocess import preprocess as clip_preprocess
from vapjax.models import clip, cogvideox_vae, t5, wan_vae
from vapjax.tokenizer import T5Tokenizer

MAX_LENGTH = 226       # CogVideoX's caption length
MAX_LENGTH_WAN = 512   # Wan's (its cross-attention hard-codes it)


class Encoders:
    """A pipeline's VAE (encode and decode) and T5. A batch is split over `devices` (default: the
    local devices) when it divides; otherwise it is replicated. With `offload` the weights live on the
    host and visit the device for each call, so they do not share it with the transformer's loop."""

    def __init__(self, vae_config: cogvideox_vae.VAEConfig, vae_params: Any, text_config: t5.T5Config,
                 text_params: Any, tokenizer: T5Tokenizer, *, tiling: cogvideox_vae.Tiling | None = None,
                 max_length: int = MAX_LENGTH, devices: Sequence[jax.Device] | None = None,
                 offload: bool = False):
        self.vae_config, self.text_config = vae_config, text_config
        self.tokenizer, self.max_length = tokenizer, max_length
        self._mesh = Mesh(np.array(devices or jax.local_devices()), ("batch",))
        replicated = NamedSharding(self._mesh, PartitionSpec())
        place = _to_host if offload else (lambda tree: _put_tree(tree, replicated))
        self._vae_params, self._text_params = place(vae_params), place(text_params)
        vae = cogvideox_vae.AutoencoderKLCogVideoX(vae_config, tiling)
        encoder = t5.T5Encoder(text_config)
        self._posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
        self._t5 = jax.jit(lambda p, ids: encoder.apply({"params": p}, ids))

    @classmethod
    def load(cls, pipeline: str, *, dtype: str | None = None, tiling: bool = False, max_length: int = MAX_LENGTH,
             devices: Sequence[jax.Device] | None = None, offload: bool = False) -> "Encoders":
        """From a converted pipeline folder (vae/, text_encoder/, tokenizer/); `dtype` sets both models'
        weights and compute (default: as stored)."""
        vcfg, vparams = checkpoint.load(os.path.join(pipeline, "vae"), "cogvideox_vae", dtype=dtype)
        tcfg, tparams = checkpoint.load(os.path.join(pipeline, "text_encoder"), "t5_encoder", dtype=dtype)
        tokenizer = T5Tokenizer.from_folder(os.path.join(pipeline, "tokenizer"))
        return cls(vcfg, vparams, tcfg, tparams, tokenizer, max_length=max_length, devices=devices,
                   tiling=cogvideox_vae.Tiling.default(vcfg) if tiling else None, offload=offload)

    def _put(self, x: np.ndarray) -> jax.Array:
        spec = PartitionSpec("batch") if len(x) % self._mesh.size == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(self._mesh, spec))

    # -- VAE ---------------------------------------------------------------------------------------

    def posterior(self, frames: np.ndarray) -> cogvideox_vae.Posterior:
        """uint8 [B, F, H, W, 3] -> the VAE posterior over latents [B, f, h, w, C] (mean, logvar)."""
        return self._posterior(self._vae_params, self._put(video.to_model_range(frames)))

    def encode_video(self, frames: np.ndarray) -> jax.Array:
        """uint8 [B, F, H, W, 3] -> posterior mean ‖ logvar [B, f, h, w, 2C] (the precomputed format)."""
        return jnp.concatenate(self.posterior(frames), axis=-1)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents [B, f, h, w, C] (already ÷ the scaling factor) -> pixels [B, F, H, W, 3] in about [-1, 1]."""
        return self._decode(self._vae_params, latents)

    # -- T5 ----------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], length: int | None = None) -> np.ndarray:
        """Token ids [B, L] (L = `length`, default max_length): truncated, </s>, padded with <pad>."""
        return self.tokenizer(list(texts), length or self.max_length)

    def encode_ids(self, ids: np.ndarray) -> jax.Array:
        """T5 of token ids [B, L] -> [B, L, D]."""
        return self._t5(self._text_params, self._put(np.asarray(ids)))

    def encode_text(self, texts: Sequence[str], length: int | None = None) -> jax.Array:
        """[B, L, D], as CogVideoX: padded to L, no mask."""
        return self.encode_ids(self.tokenize(texts, length))

    def output_shapes(self, frames: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Per-example shapes of the precomputed features for clips of frames × height × width."""
        clip = lambda f: jax.ShapeDtypeStruct((1, f, height, width, 3), jnp.float32)  # noqa: E731
        ids = jax.ShapeDtypeStruct((1, self.max_length), jnp.int32)
        dist = lambda f: jax.eval_shape(lambda p, x: jnp.concatenate(self._posterior(p, x), -1),  # noqa: E731
                                        self._vae_params, clip(f))
        shapes = {"latent_dist": dist(frames), "image_dist": dist(1),
                  "text": jax.eval_shape(self._t5, self._text_params, ids)}
        return {k: tuple(s.shape[1:]) for k, s in shapes.items()}


class WanEncoders:
    """Wan's frozen encoders: the VAE (pixels <-> normalised latents), UMT5 (Wan's masked, zero-padded
    captions, `vapjax.text`) and the CLIP vision tower (penultimate states, exact CLIPImageProcessor).

    With `offload` (default) the weights live on the host and visit the device for each call, so the
    transformer's sampling loop does not share the accelerator with UMT5-XXL (11 GB in bf16), CLIP
    ViT-H (2.5 GB in fp32) and the VAE (0.5 GB in fp32)."""

    def __init__(self, vae_config: wan_vae.VAEConfig, vae_params: Any, text_config: t5.T5Config,
                 text_params: Any, tokenizer: T5Tokenizer, clip_config: clip.CLIPVisionConfig, clip_params: Any,
                 clip_preprocess: CLIPPreprocessConfig, *, tiling: wan_vae.Tiling | None = None,
                 offload: bool = True):
        self.vae_config, self.text_config, self.clip_config = vae_config, text_config, clip_config
        self.tokenizer, self.clip_preprocess = tokenizer, clip_preprocess
        self._vae_params = _to_host(vae_params) if offload else vae_params
        self._text_params = _to_host(text_params) if offload else text_params
        self._clip_params = _to_host(clip_params) if offload else clip_params
        vae = wan_vae.AutoencoderKLWan(vae_config, tiling)
        self._posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
        self._moments = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="moments"))
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
        self._umt5 = jax.jit(lambda p, ids: t5.T5Encoder(text_config).apply({"params": p}, ids))

    @classmethod
    def load(cls, pipeline: str, *, dtype: str | None = None, vae_dtype: str | None = "float32",
             image_encoder_dtype: str | None = "float32", tiling: bool = False, offload: bool = True) -> "WanEncoders":
        """From a converted Wan pipeline folder (vae/, text_encoder/, image_encoder/, tokenizer/,
        image_processor/). `dtype` sets UMT5's weights and compute; the VAE and CLIP default to float32,
        as the official inference script loads them (infer/wan_vap.py); None keeps what is stored."""
        ccfg, cparams = checkpoint.load(os.path.join(pipeline, "image_encoder"), "clip_vision", dtype=image_encoder_dtype)
        tcfg, tparams = checkpoint.load(os.path.join(pipeline, "text_encoder"), "t5_encoder", dtype=dtype)
        vcfg, vparams = checkpoint.load(os.path.join(pipeline, "vae"), "wan_vae", dtype=vae_dtype)
        tokenizer = T5Tokenizer.from_folder(os.path.join(pipeline, "tokenizer"))
        pre = CLIPPreprocessConfig.from_file(os.path.join(pipeline, "image_processor", "preprocessor_config.json"))
        return cls(vcfg, vparams, tcfg, tparams, tokenizer, ccfg, cparams, pre, offload=offload,
                   tiling=wan_vae.Tiling() if tiling else None)

    # -- VAE ---------------------------------------------------------------------------------------

    def moments(self, frames: np.ndarray) -> jax.Array:
        """Pixels float32 [B, F, H, W, 3] in [-1, 1] -> the encoder's raw mean ‖ log-variance [B, f, h, w, 2C]
        (log-variance unclipped; what the official trainer normalises, spec §8.9)."""
        return self._moments(self._vae_params, jnp.asarray(frames))

    def mode(self, frames: np.ndarray) -> jax.Array:
        """Pixels float32 [B, F, H, W, 3] in [-1, 1] -> the posterior mode [B, f, h, w, C], not yet
        normalised (`vae_config.normalize`); the pipeline uses the mode, WPIPE:431."""
        return self._posterior(self._vae_params, jnp.asarray(frames)).mode()

    def decode(self, latents: jax.Array) -> jax.Array:
        """Normalised latents [B, f, h, w, C] -> pixels [B, F, H, W, 3] in [-1, 1] (de-normalised first,
        z / (1/std) + mean, in the VAE's dtype as the pipeline casts to it)."""
        z = self.vae_config.denormalize(latents.astype(jnp.float32)).astype(self.vae_config.dtype)
        return self._decode(self._vae_params, z)

    # -- UMT5 and CLIP -----------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str], length: int = MAX_LENGTH_WAN) -> tuple[np.ndarray, np.ndarray]:
        """Cleaned (prompt_clean) and tokenised captions: ids and attention mask, int32 [B, length]."""
        return text.tokenize_umt5(self.tokenizer, list(texts), length)

    def encode_text(self, texts: Sequence[str], length: int = MAX_LENGTH_WAN) -> jax.Array:
        """[B, length, D] in the encoder's dtype: masked UMT5, rows past each caption zero."""
        return text.encode_umt5(self.tokenizer, self.text_config, self._text_params, list(texts), length)

    def encode_text_unmasked(self, texts: Sequence[str], length: int = MAX_LENGTH_WAN) -> jax.Array:
        """[B, length, D] as the official *trainer* encodes captions (spec §7.6, §8.11): no prompt cleaning,
        no attention mask, the pads' outputs kept."""
        return self._umt5(self._text_params, self.tokenizer(list(texts), length))

    def image_pixels(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB [B, H, W, 3] (any size) -> CLIP pixels float32 [B, crop, crop, 3]."""
        return clip_preprocess(images, self.clip_preprocess)

    def image_embeds(self, pixels: np.ndarray) -> jax.Array:
        """CLIP pixels -> penultimate hidden states [B, 257, D_clip] in CLIP's dtype."""
        return clip.image_embeds(self.clip_config, self._clip_params, pixels)


def _to_host(tree: Any) -> Any:
    """The arrays of `tree` as host numpy arrays; their device buffers are freed. Abstract leaves
    (ShapeDtypeStructs: a dry run's weights) stay as they are."""
    host = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.device_get(x), tree)
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()
    return host


def _put_tree(tree: Any, sharding: Any) -> Any:
    """`jax.device_put` of every array of `tree`; abstract leaves (ShapeDtypeStructs) stay as they are."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, sharding), tree)
