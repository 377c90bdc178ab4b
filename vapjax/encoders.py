"""The frozen CogVideoX encoders, VAE and T5, jitted: one wrapper for sampling and for the latent
precompute / on-the-fly training encoders, so inference and training encode alike.

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

from vapjax import checkpoint, video
from vapjax.models import cogvideox_vae, t5
from vapjax.tokenizer import T5Tokenizer

MAX_LENGTH = 226


class Encoders:
    """A pipeline's VAE (encode and decode) and T5. A batch is split over `devices` (default: the
    local devices) when it divides; otherwise it is replicated."""

    def __init__(self, vae_config: cogvideox_vae.VAEConfig, vae_params: Any, text_config: t5.T5Config,
                 text_params: Any, tokenizer: T5Tokenizer, *, tiling: cogvideox_vae.Tiling | None = None,
                 max_length: int = MAX_LENGTH, devices: Sequence[jax.Device] | None = None):
        self.vae_config, self.text_config = vae_config, text_config
        self.tokenizer, self.max_length = tokenizer, max_length
        self._mesh = Mesh(np.array(devices or jax.local_devices()), ("batch",))
        replicated = NamedSharding(self._mesh, PartitionSpec())
        self._vae_params = jax.device_put(vae_params, replicated)
        self._text_params = jax.device_put(text_params, replicated)
        vae = cogvideox_vae.AutoencoderKLCogVideoX(vae_config, tiling)
        encoder = t5.T5Encoder(text_config)
        self._posterior = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))
        self._decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
        self._t5 = jax.jit(lambda p, ids: encoder.apply({"params": p}, ids))

    @classmethod
    def load(cls, pipeline: str, *, dtype: str | None = None, tiling: bool = False, max_length: int = MAX_LENGTH,
             devices: Sequence[jax.Device] | None = None) -> "Encoders":
        """From a converted pipeline folder (vae/, text_encoder/, tokenizer/); `dtype` sets both models'
        weights and compute (default: as stored)."""
        vcfg, vparams = checkpoint.load(os.path.join(pipeline, "vae"), "cogvideox_vae", dtype=dtype)
        tcfg, tparams = checkpoint.load(os.path.join(pipeline, "text_encoder"), "t5_encoder", dtype=dtype)
        tokenizer = T5Tokenizer.from_folder(os.path.join(pipeline, "tokenizer"))
        return cls(vcfg, vparams, tcfg, tparams, tokenizer, max_length=max_length, devices=devices,
                   tiling=cogvideox_vae.Tiling.default(vcfg) if tiling else None)

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
