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
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vapjax import checkpoint, video
from vapjax.encoders import MAX_LENGTH, MAX_LENGTH_WAN, Encoders, WanEncoders


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
    module docstring), from the pipeline's `WanEncoders` (CLIP through the very path inference takes)."""

    def __init__(self, encoders: WanEncoders, *, text_length: int = MAX_LENGTH_WAN):
        self.encoders, self.text_length = encoders, text_length
        norm = encoders.vae_config.normalize

        def latents(moments, cond_moments):
            """Normalised moments of the clip, normalised mode of [first frame, zeros…]."""
            mean, logvar = jnp.split(moments.astype(jnp.float32), 2, -1)
            mode = jnp.split(cond_moments.astype(jnp.float32), 2, -1)[0]
            return jnp.concatenate([norm(mean), norm(logvar)], -1), norm(mode)

        self._latents = jax.jit(latents)

    @classmethod
    def load(cls, pipeline: str, *, text_length: int | None = None, dtype: str | None = None,
             tiling: bool = False) -> "WanFeatures":
        """From a converted Wan pipeline folder (`WanEncoders.load`, encoders kept on the device); `dtype`
        sets UMT5's weights and compute (the VAE and CLIP stay float32 unless it is given)."""
        encoders = WanEncoders.load(pipeline, dtype=dtype, vae_dtype=dtype or "float32",
                                    image_encoder_dtype=dtype or "float32", tiling=tiling, offload=False)
        return cls(encoders, text_length=text_length or MAX_LENGTH_WAN)

    def encode(self, clips: np.ndarray, captions: Sequence[str]) -> dict[str, jax.Array]:
        enc = self.encoders
        x = video.to_model_range(clips)
        cond = np.concatenate([x[:, :1], np.zeros_like(x[:, 1:])], axis=1)
        latent_dist, condition = self._latents(enc.moments(x), enc.moments(cond))
        return {"latent_dist": latent_dist, "condition": condition,
                "image_embeds": enc.image_embeds(enc.image_pixels(clips[:, 0])),
                "text": enc.encode_text_unmasked(captions, self.text_length)}

    def output_shapes(self, frames: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        enc = self.encoders
        clip_in = jax.ShapeDtypeStruct((1, frames, height, width, 3), jnp.float32)
        moments = jax.eval_shape(enc.moments, clip_in)
        latent_dist, condition = jax.eval_shape(self._latents, moments, moments)
        crop = jax.ShapeDtypeStruct((1, enc.clip_preprocess.crop_height, enc.clip_preprocess.crop_width, 3),
                                    jnp.float32)
        shapes = {"latent_dist": latent_dist, "condition": condition,
                  "image_embeds": jax.eval_shape(enc.image_embeds, crop),
                  "text": jax.eval_shape(lambda: enc.encode_text_unmasked([""], self.text_length))}
        return {k: tuple(s.shape[1:]) for k, s in shapes.items()}

    def empty_text(self) -> np.ndarray:
        return np.asarray(self.encoders.encode_text_unmasked([""], self.text_length), np.float32)[0]

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
