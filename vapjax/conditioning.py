"""The VAP input contract: what the transformer sees besides the noisy target.

One function per model family turns encoder outputs (scaled VAE latents, caption embeddings) into the
transformer's conditioning inputs. The sampling pipelines and the training objectives both call it, so
inference and training cannot drift apart (spec §4.1, §4.3).

CogVideoX (spec §4.1): the image condition is the first target frame's latents, zero-padded to the
clip's latent length; each reference's expert input is [reference latents | its first frame's latents,
zero-padded] on channels; references are concatenated on frames, their captions on the sequence axis.

Wan (spec §4.2, §8.22): every latent is normalised per channel ((z − mean)/std, `VAEConfig.normalize`).
The target's condition is the encoding of [first frame, zeros × (num_frames − 1)] behind the 4-channel
first-frame mask: [mask | condition] stands beside the noisy latents (16 + 4 + 16 = 36 channels). The
one reference's expert input has the same layout with its clean latents in place of the noise:
[reference latents | mask | reference condition], the condition built the same way from its first frame.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def pad_frames(z: Array, frames: int, axis: int = 1) -> Array:
    """Zero-pad the frame axis of latents to `frames` (a one-frame condition to the clip's length)."""
    pad = [(0, 0)] * z.ndim
    pad[axis] = (0, frames - z.shape[axis])
    return jnp.pad(z, pad)


def cogvideox(image: Array, ref_latents: Array, ref_first: Array, text: Array, ref_text: Array) -> dict[str, Array]:
    """CogVideoX-VAP conditioning, channels-last, latents already × the VAE scaling factor.

    image       [B, 1, h, w, C]     the target's first frame, encoded alone
    ref_latents [B, N, F, h, w, C]  each reference clip
    ref_first   [B, N, 1, h, w, C]  each reference's first frame, encoded alone
    text        [B, S, D]           target caption embeddings
    ref_text    [B, N, S, D]        reference caption embeddings

    Returns `image` [B, F, h, w, C] (to stand beside the noisy latents), `ref_latents`
    [B, N·F, h, w, 2C] (the expert's input), `text` [B, S, D] and `ref_text` [B, N·S, D].
    """
    b, n, f = ref_latents.shape[:3]
    ref_input = jnp.concatenate([ref_latents, pad_frames(ref_first, f, axis=2)], axis=-1)
    return dict(image=pad_frames(image, f), ref_latents=ref_input.reshape((b, n * f) + ref_input.shape[3:]),
                text=text, ref_text=ref_text.reshape((b, n * ref_text.shape[2], ref_text.shape[3])))


def i2v_mask(shape: tuple[int, ...], channels: int = 4, dtype=jnp.float32) -> Array:
    """Wan's image-to-video mask for latents of `shape` [B, f, h, w, ...]: `channels` (the VAE's
    temporal compression, 4) channels, 1 on the first latent frame (the given image), 0 elsewhere
    (WPIPE:437-447: the first pixel frame repeated 4 times, then 4 pixel frames per latent frame)."""
    b, f, h, w = shape[:4]
    return jnp.broadcast_to((jnp.arange(f) == 0).astype(dtype)[None, :, None, None, None], (b, f, h, w, channels))


def wan(condition: Array, ref_latents: Array, ref_condition: Array, text: Array, ref_text: Array,
        image_embeds: Array, ref_image_embeds: Array, mask_channels: int = 4) -> dict[str, Array]:
    """Wan-VAP conditioning for one reference, channels-last, latents already normalised.

    condition      [B, f, h, w, C]  encoding of [target first frame, zeros…] (the clip's length)
    ref_latents    [B, f, h, w, C]  the reference clip
    ref_condition  [B, f, h, w, C]  encoding of [reference first frame, zeros…]
    text, ref_text [B, S, D]        caption embeddings (512 tokens, zero past each caption)
    image_embeds, ref_image_embeds  [B, 257, D_clip]  CLIP of the target image / the reference's first frame

    Returns `condition` [B, f, h, w, mask + C] (to stand beside the noisy latents), `ref_latents`
    [B, f, h, w, C + mask + C] (the expert's input) and the embeddings unchanged.
    """
    mask = i2v_mask(condition.shape, mask_channels, condition.dtype)
    return dict(condition=jnp.concatenate([mask, condition], axis=-1),
                ref_latents=jnp.concatenate([ref_latents, mask.astype(ref_latents.dtype), ref_condition], axis=-1),
                text=text, ref_text=ref_text, image=image_embeds, ref_image=ref_image_embeds)
