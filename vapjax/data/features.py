"""Each model family's per-clip training features, from decoded clips: what `precompute` stores in
`vap_latents` and what the trainer's on-the-fly path (`EncodedBatches`) computes — one code path.

A features object (one class per family, chosen by the pipeline's VAE kind in `FEATURES`) has
    encode(clips uint8 [B, F, H, W, 3], captions) -> {name: [B, ...]}   the stored fields
    output_shapes(frames, height, width) -> {name: per-example shape}
    empty_text() -> float32 [L, D]                                       the caption "" (caption dropout)
    metadata() -> dict                                                   recorded with a precomputed dataset
Every clip is encoded the same way whether it serves as a target or as a reference: the loader pairs
examples into `ref_<name>` fields, and the objectives turn them into the expert's input.

CogVideoX (spec §4.3): the VAE posterior (mean ‖ logvar) of the clip and of its first frame encoded
alone; T5 captions (226 tokens, no attention mask, pads kept). The trainer draws the samples.

Wan (spec §4.3, §7.6, §8.9–§8.11), as the official trainer computes them:
    latent_dist   the clip's VAE moments with the official normalisation quirk: the mean AND the
                  log-variance are normalised per channel, (x − mean)·(1/std); the trainer then clips the
                  log-variance to [−30, 20] and draws x0 = μ' + exp(logvar'/2)·ε, as the official
                  DiagonalGaussianDistribution does after the normalisation
    condition     the normalised posterior mode of [first frame, zeros × (F − 1)] (the I2V condition)
    image_embeds  CLIP ViT-H penultimate states [257, 1280] of the first frame
    text          UMT5 [512, 4096]: no attention mask, pads kept, no prompt cleaning (unlike inference)
The official trainer feeds CLIP a per-pixel min–max normalisation of the frame across its RGB channels,
which zeroes the whole image as soon as any pixel is grey (spec §8.10, FNORM:17-47) — nearly every real
frame — while its inference pipeline gives CLIP the frame itself. We deliberately train on what
inference sees: the frame through the standard CLIP preprocessing (`vapjax.clip_preprocess`, the
pipeline's image processor config). Training with the quirk would teach the expert a near-constant
image embedding it never meets at inference.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vapjax import checkpoint, video
from vapjax.clip_preprocess import CLIPPreprocessConfig
from vapjax.clip_preprocess import preprocess as clip_preprocess
from vapjax.encoders import MAX_LENGTH, Encoders
from vapjax.models import clip, t5, wan_vae
from vapjax.tokenizer import T5Tokenizer

WAN_TEXT_LENGTH = 512


class CogVideoXFeatures:
    """CogVideoX: `latent_dist`, `image_dist` (posteriors, mean ‖ logvar) and `text` (T5) of each clip."""

    def __init__(self, encoders: Encoders):
        self.encoders = encoders

    @classmethod
    def load(cls, pipeline: str, *, text_length: int | None = None, dtype: str | None = None,
             tiling: bool = False) -> "CogVideoXFeatures":
        return cls(Encoders.load(pipeline, dtype=dtype, tiling=tiling, max_length=text_length or MAX_LENGTH))

    def encode(self, clips: np.ndarray, captions: Sequence[str]) -> dict[str, jax.Array]:
        enc = self.encoders
        return {"latent_dist": enc.encode_video(clips), "image_dist": enc.encode_video(clips[:, :1]),
                "text": enc.encode_text(list(captions))}

    def output_shapes(self, frames: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return self.encoders.output_shapes(frames, height, width)

    def empty_text(self) -> np.ndarray:
        return np.asarray(self.encoders.encode_text([""]), np.float32)[0]

    def metadata(self) -> dict:
        return {"family": "cogvideox", "scaling_factor": self.encoders.vae_config.scaling_factor,
                "max_length": self.encoders.max_length}


class WanFeatures:
    """Wan: `latent_dist` (normalised moments), `condition`, `image_embeds` and `text` of each clip (see the
    module docstring). A batch is split over `devices` (default: the local devices) when it divides."""

    def __init__(self, vae_config: wan_vae.VAEConfig, vae_params: Any, text_config: t5.T5Config, text_params: Any,
                 tokenizer: T5Tokenizer, clip_config: clip.CLIPVisionConfig, clip_params: Any,
                 clip_pre: CLIPPreprocessConfig, *, text_length: int = WAN_TEXT_LENGTH,
                 tiling: wan_vae.Tiling | None = None, devices: Sequence[jax.Device] | None = None):
        self.vae_config, self.text_config, self.clip_config = vae_config, text_config, clip_config
        self.tokenizer, self.clip_pre, self.text_length = tokenizer, clip_pre, text_length
        self._mesh = Mesh(np.array(devices or jax.local_devices()), ("batch",))
        replicated = NamedSharding(self._mesh, PartitionSpec())
        self._params = jax.device_put((vae_params, text_params, clip_params), replicated)
        vae, encoder = wan_vae.AutoencoderKLWan(vae_config, tiling), t5.T5Encoder(text_config)
        norm = vae_config.normalize

        def latents(p, x):
            """Normalised moments of the clip, normalised mode of [first frame, zeros…]."""
            mean, logvar = jnp.split(vae.apply({"params": p}, x, method="moments").astype(jnp.float32), 2, -1)
            cond = jnp.concatenate([x[:, :1], jnp.zeros_like(x[:, 1:])], axis=1)
            mode = jnp.split(vae.apply({"params": p}, cond, method="moments").astype(jnp.float32), 2, -1)[0]
            return jnp.concatenate([norm(mean), norm(logvar)], -1), norm(mode)

        self._latents = jax.jit(latents)
        self._text = jax.jit(lambda p, ids: encoder.apply({"params": p}, ids))
        self._clip = lambda p, pixels: clip.image_embeds(clip_config, p, pixels)

    @classmethod
    def load(cls, pipeline: str, *, text_length: int | None = None, dtype: str | None = None,
             tiling: bool = False) -> "WanFeatures":
        """From a converted Wan pipeline folder (vae/, text_encoder/, tokenizer/, image_encoder/,
        image_processor/preprocessor_config.json); `dtype` sets every encoder's weights and compute."""
        vcfg, vparams = checkpoint.load(os.path.join(pipeline, "vae"), "wan_vae", dtype=dtype)
        tcfg, tparams = checkpoint.load(os.path.join(pipeline, "text_encoder"), "t5_encoder", dtype=dtype)
        ccfg, cparams = checkpoint.load(os.path.join(pipeline, "image_encoder"), "clip_vision", dtype=dtype)
        tokenizer = T5Tokenizer.from_folder(os.path.join(pipeline, "tokenizer"))
        pre = CLIPPreprocessConfig.from_file(os.path.join(pipeline, "image_processor", "preprocessor_config.json"))
        return cls(vcfg, vparams, tcfg, tparams, tokenizer, ccfg, cparams, pre,
                   text_length=text_length or WAN_TEXT_LENGTH, tiling=wan_vae.Tiling() if tiling else None)

    def _put(self, x: np.ndarray) -> jax.Array:
        spec = PartitionSpec("batch") if len(x) % self._mesh.size == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(self._mesh, spec))

    def encode_text(self, captions: Sequence[str]) -> jax.Array:
        """UMT5 as the official trainer: padded to text_length, no mask, pads kept, no cleaning."""
        return self._text(self._params[1], self._put(self.tokenizer(list(captions), self.text_length)))

    def image_embeds(self, frames: np.ndarray) -> jax.Array:
        """uint8 first frames [B, H, W, 3] -> CLIP penultimate states [B, tokens, width] (see the module
        docstring for why this is the inference preprocessing, not the official trainer's)."""
        return self._clip(self._params[2], self._put(clip_preprocess(frames, self.clip_pre)))

    def encode(self, clips: np.ndarray, captions: Sequence[str]) -> dict[str, jax.Array]:
        latent_dist, condition = self._latents(self._params[0], self._put(video.to_model_range(clips)))
        return {"latent_dist": latent_dist, "condition": condition, "image_embeds": self.image_embeds(clips[:, 0]),
                "text": self.encode_text(captions)}

    def output_shapes(self, frames: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        clip_in = jax.ShapeDtypeStruct((1, frames, height, width, 3), jnp.float32)
        latent_dist, condition = jax.eval_shape(self._latents, self._params[0], clip_in)
        crop = jax.ShapeDtypeStruct((1, self.clip_pre.crop_height, self.clip_pre.crop_width, 3), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, self.text_length), jnp.int32)
        shapes = {"latent_dist": latent_dist, "condition": condition,
                  "image_embeds": jax.eval_shape(self._clip, self._params[2], crop),
                  "text": jax.eval_shape(self._text, self._params[1], ids)}
        return {k: tuple(s.shape[1:]) for k, s in shapes.items()}

    def empty_text(self) -> np.ndarray:
        return np.asarray(self.encode_text([""]), np.float32)[0]

    def metadata(self) -> dict:
        return {"family": "wan", "max_length": self.text_length,
                "latents": "VAE moments, mean and log-variance both normalised per channel (official quirk)",
                "clip": "first frame, standard CLIP preprocessing (not the official trainer's min-max quirk)"}


# The pipeline's VAE kind -> its family's features.
FEATURES = {"cogvideox_vae": CogVideoXFeatures, "wan_vae": WanFeatures}


def load_features(pipeline: str, *, text_length: int | None = None, dtype: str | None = None,
                  tiling: bool = False):
    """The features of a converted pipeline folder's family (by its vae/ kind); `text_length` defaults to
    the family's caption length."""
    kind = checkpoint.read_kind(os.path.join(pipeline, "vae"))
    if kind not in FEATURES:
        raise checkpoint.CheckpointError(f"{pipeline}/vae: a {kind!r} is not the VAE of any model family")
    return FEATURES[kind].load(pipeline, text_length=text_length, dtype=dtype, tiling=tiling)


class EncodedBatches:
    """Raw `vap_data` batches (make_loader(kind="raw")) encoded on the fly into the latents format of
    `features`' family, for training without a precompute pass. Checkpointable like the iterator it wraps."""

    def __init__(self, raw: Iterator[dict], features):
        self.raw, self.features = raw, features

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self.raw)
        n = b["ref_video"].shape[1]
        refs = b["ref_video"].reshape((-1,) + b["ref_video"].shape[2:])
        target = self.features.encode(b["video"], [str(c) for c in b["caption"]])
        ref = self.features.encode(refs, [str(c) for c in np.ravel(b["ref_caption"])])
        out = {k: np.asarray(v, np.float32) for k, v in target.items()}
        out.update({f"ref_{k}": np.asarray(v, np.float32).reshape((-1, n) + v.shape[1:]) for k, v in ref.items()})
        return {**out, "index": b["index"], "ref_index": b["ref_index"]}

    def get_state(self):
        return self.raw.get_state()

    def set_state(self, state) -> None:
        self.raw.set_state(state)
