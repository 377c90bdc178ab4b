"""The VAP input contract: what the transformer sees besides the noisy target.

One function per model family turns encoder outputs (scaled VAE latents, caption embeddings) into the
transformer's conditioning inputs. The sampling pipelines and the training objectives both call it, so
inference and training cannot drift apart (spec §4.1, §4.3).

CogVideoX (spec §4.1): the image condition is the first target frame's latents, zero-padded to the
clip's latent length; each reference's expert input is [reference latents | its first frame's latents,
zero-padded] on channels; references are concatenated on frames, their captions on the sequence axis.
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
