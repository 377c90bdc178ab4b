"""Video-As-Prompt generation with CogVideoX-I2V: image + reference video(s) + captions -> video.

What the official `CogVideoXImageToVideoMOTPipeline` computes (spec §4.1, §5.1):
1. Reference frames chosen "evenly" (floor(linspace)), every frame resized to the output size.
2. VAE encodes, each ×scaling_factor (0.7): the target image (one latent frame, zero-padded to the
   video's latent length) → the image condition; each reference video → its latents; each reference's
   first frame alone (zero-padded) → its first-frame condition. Expert input per reference:
   [reference latents | first-frame latents] on channels; references concatenated on frames.
3. T5 on the prompt, the negative prompt and each reference caption (padded to L, no mask).
4. DDIM (v-prediction) with classifier-free guidance in one batch [uncond, cond]: the unconditional
   half swaps BOTH the target caption and the reference captions for the negative prompt, and keeps
   the reference video. Optional dynamic CFG (the official formula, quirks included).
5. Decode latents ÷ scaling_factor; frames = clip(x/2 + 1/2, 0, 1).
Everything runs in JAX; the denoising loop is one `lax.scan` inside one `jit`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vapjax import checkpoint, sampling, video
from vapjax.random_init import random_params
from vapjax.models import cogvideox, cogvideox_vae, t5
from vapjax.tokenizer import T5Tokenizer

DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards")
MAX_REFERENCES = 3


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: what to make and how (defaults: the official inference scripts)."""
    prompt: str
    ref_prompts: tuple[str, ...]
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    negative_ref_prompt: str = DEFAULT_NEGATIVE_PROMPT
    height: int = 480
    width: int = 720
    num_frames: int = 49
    steps: int = 50
    guidance_scale: float = 6.0
    dynamic_cfg: bool = True
    max_sequence_length: int = 226
    frames_selection: str = "evenly"   # or "first"
    posterior: str = "sample"          # VAE encodes: "sample" (official) or "mode"
    seed: int = 0


@dataclasses.dataclass
class Output:
    frames: np.ndarray                 # float32 [F, H, W, 3] in [0, 1]
    latents: np.ndarray                # final latents [1, f, h, w, C]
    trace: dict[str, np.ndarray] | None = None   # intermediates (record=True), channels-last


@dataclasses.dataclass
class Component:
    config: Any
    params: Any


class CogVideoXVAP:
    """The pipeline's components and its jitted stages. Build with `load(folder)` (a converted
    pipeline, see `python -m convert`) or `random(...)` (random weights, for demos and tests)."""

    def __init__(self, transformer: Component, vae: Component, text_encoder: Component,
                 tokenizer: T5Tokenizer, schedule: sampling.DDIMSchedule, tiling: cogvideox_vae.Tiling | None = None):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.tokenizer, self.schedule = tokenizer, schedule
        tcfg, vcfg, ecfg = transformer.config, vae.config, text_encoder.config
        vae_model = cogvideox_vae.AutoencoderKLCogVideoX(vcfg, tiling)
        self._encode_text = jax.jit(lambda p, ids: t5.T5Encoder(ecfg).apply({"params": p}, ids))
        self._vae_encode = jax.jit(lambda p, x: vae_model.apply({"params": p}, x, method="encode"))
        self._vae_decode = jax.jit(lambda p, z: vae_model.apply({"params": p}, z, method="decode"))
        self._denoise = jax.jit(partial(_denoise, tcfg), static_argnames=("guided", "record", "progress"))

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str, *, dtype: str | None = None, attention: str | None = None,
             tiling: bool = False) -> "CogVideoXVAP":
        """A converted pipeline folder. `dtype` ("bfloat16"/"float32") sets weights and compute of all
        models (default: as stored); `attention` picks the dot_product_attention implementation."""
        _require_pipeline_folder(path)
        load = lambda name, kind, **options: checkpoint.load(os.path.join(path, name), kind, dtype=dtype, **options)
        tcfg, tparams = load("transformer", "cogvideox_transformer", attention=attention)
        vcfg, vparams = load("vae", "cogvideox_vae")
        ecfg, eparams = load("text_encoder", "t5_encoder")
        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            schedule = sampling.DDIMSchedule.from_config(json.load(f))
        return cls(Component(tcfg, tparams), Component(vcfg, vparams), Component(ecfg, eparams),
                   T5Tokenizer.from_folder(os.path.join(path, "tokenizer")), schedule,
                   cogvideox_vae.Tiling.default(vcfg) if tiling else None)

    @classmethod
    def random(cls, transformer: cogvideox.CogVideoXConfig, vae: cogvideox_vae.VAEConfig, text_encoder: t5.T5Config,
               tokenizer: str, scheduler: dict, seed: int = 0) -> "CogVideoXVAP":
        """Random weights (a demo that needs no download; outputs are noise-like, not meaningful)."""
        key = jax.random.PRNGKey(0)
        init = lambda fn, cfg, i: random_params(jax.eval_shape(partial(fn, cfg), key), seed * 3 + i)
        return cls(Component(transformer, init(cogvideox.init_params, transformer, 0)),
                   Component(vae, init(cogvideox_vae.init_params, vae, 1)),
                   Component(text_encoder, init(t5.init_params, text_encoder, 2)),
                   T5Tokenizer.from_folder(tokenizer), sampling.DDIMSchedule.from_config(scheduler))

    # -- stages ------------------------------------------------------------------------------------

    def encode_text(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, jax.Array]:
        ids = self.tokenizer(list(texts), length)
        return ids, self._encode_text(self.text_encoder.params, jnp.asarray(ids))

    def encode_video(self, pixels: jax.Array, rng: jax.Array, posterior: str) -> jax.Array:
        """pixels [B, F, H, W, 3] in [-1, 1] -> latents (a posterior sample or its mode), unscaled."""
        post = self._vae_encode(self.vae.params, pixels)
        return post.mode() if posterior == "mode" else post.sample(rng)

    # -- generation --------------------------------------------------------------------------------

    def validate(self, image: np.ndarray, ref_videos: Sequence[np.ndarray], req: Request) -> None:
        """One-line errors for requests the model cannot serve."""
        c = self.transformer.config
        ratio = self.vae.config.temporal_compression_ratio
        spatial = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if req.num_frames < 1 or (req.num_frames - 1) % ratio:
            raise ValueError(f"num_frames={req.num_frames}: must be {ratio}k+1 (e.g. 49)")
        unit = spatial * c.patch_size
        if req.height % unit or req.width % unit or req.height <= 0 or req.width <= 0:
            raise ValueError(f"{req.height}x{req.width}: height and width must be positive multiples of {unit}")
        if c.use_learned_pos and (req.height // spatial, req.width // spatial) != (c.sample_height, c.sample_width):
            raise ValueError(f"{req.height}x{req.width}: this model's learned position table only allows "
                             f"{c.sample_height * spatial}x{c.sample_width * spatial}")
        if not 1 <= len(ref_videos) <= MAX_REFERENCES:
            raise ValueError(f"{len(ref_videos)} reference videos: VAP takes 1 to {MAX_REFERENCES}")
        if len(req.ref_prompts) != len(ref_videos):
            raise ValueError(f"{len(ref_videos)} reference videos but {len(req.ref_prompts)} reference prompts")
        if not c.expert_layers:
            raise ValueError("this checkpoint has no VAP expert (a stock CogVideoX transformer)")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
        for i, v in enumerate(ref_videos):
            if v.ndim != 4 or v.shape[-1] != 3:
                raise ValueError(f"reference video {i} must be [F, H, W, 3] RGB, got shape {v.shape}")
            if len(v) < req.num_frames:
                raise ValueError(f"reference video {i} has {len(v)} frames; {req.num_frames} are needed")
        if req.posterior not in ("sample", "mode"):
            raise ValueError(f"posterior={req.posterior!r}: 'sample' or 'mode'")

    def __call__(self, image: np.ndarray, ref_videos: Sequence[np.ndarray], req: Request, *,
                 latents: np.ndarray | None = None, record: bool = False,
                 progress: Callable[[Any], None] | None = None) -> Output:
        """image uint8 [H, W, 3]; ref_videos: uint8 [F, H, W, 3] each; `latents` overrides the initial
        noise [1, f, h, w, C]; `record` keeps every intermediate in `Output.trace`."""
        self.validate(image, ref_videos, req)
        tcfg = self.transformer.config
        dtype = jnp.dtype(tcfg.dtype)
        n_ref, h, w, f = len(ref_videos), req.height, req.width, req.num_frames

        # 1. Pixels: reference frames chosen over each reference's own length, resized, in [-1, 1].
        px = lambda frames: jnp.asarray(video.to_model_range(video.resize(frames, h, w)))[None]
        refs = [v[video.select_frames(len(v), f, req.frames_selection)] for v in ref_videos]

        # 2. Latents (×0.7). First-frame conditions are one latent frame, zero-padded to the video length.
        k_noise, k_image, *k_refs = jax.random.split(jax.random.PRNGKey(req.seed), 2 + 2 * n_ref)
        raw = {"image": self.encode_video(px(image[None]), k_image, req.posterior)}
        for i, r in enumerate(refs):
            raw[f"ref_video.{i}"] = self.encode_video(px(r), k_refs[2 * i], req.posterior)
            raw[f"ref_first_frame.{i}"] = self.encode_video(px(r[:1]), k_refs[2 * i + 1], req.posterior)
        scale = lambda z: (z * self.vae.config.scaling_factor).astype(dtype)
        lf = (f - 1) // self.vae.config.temporal_compression_ratio + 1
        pad = lambda z: jnp.pad(z, ((0, 0), (0, lf - z.shape[1]), (0, 0), (0, 0), (0, 0)))
        image_latents = pad(scale(raw["image"]))
        ref_latents = [scale(raw[f"ref_video.{i}"]) for i in range(n_ref)]
        ref_first = [pad(scale(raw[f"ref_first_frame.{i}"])) for i in range(n_ref)]
        ref_input = jnp.concatenate([jnp.concatenate([z, z0], -1) for z, z0 in zip(ref_latents, ref_first)], axis=1)

        # 3. Text: [negative, prompt] for the target; per reference caption, concatenated on the sequence.
        L = req.max_sequence_length
        ids, emb = self.encode_text([req.negative_prompt, req.prompt, req.negative_ref_prompt, *req.ref_prompts], L)
        emb = emb.astype(dtype)
        neg, pos, neg_ref, pos_refs = emb[0:1], emb[1:2], emb[2:3], emb[3:]
        ref_text_pos = pos_refs.reshape(1, n_ref * L, -1)
        ref_text_neg = jnp.concatenate([neg_ref] * n_ref, axis=1)

        guided = req.guidance_scale > 1.0
        if guided:  # one batch [uncond, cond]; the reference video is the same in both halves
            text = jnp.concatenate([neg, pos])
            ref_text = jnp.concatenate([ref_text_neg, ref_text_pos])
            image_in, ref_in = jnp.concatenate([image_latents] * 2), jnp.concatenate([ref_input] * 2)
        else:
            text, ref_text, image_in, ref_in = pos, ref_text_pos, image_latents, ref_input

        # 4. Denoise.
        steps = self.schedule.steps(req.steps)
        scales = np.array([sampling.dynamic_cfg_scale(req.guidance_scale, t, req.steps) if req.dynamic_cfg
                           else req.guidance_scale for t in steps.timestep], np.float64)
        shape = (1, lf, h // 8, w // 8, tcfg.out_channels)
        if latents is None:
            x = jax.random.normal(k_noise, shape, dtype)
        else:
            x = jnp.asarray(latents)
            if x.shape != shape:
                raise ValueError(f"latents of shape {x.shape}, expected {shape}")
        out = self._denoise(self.transformer.params, x, image_in, ref_in, text, ref_text, steps,
                            jnp.asarray(scales, jnp.float32), guided=guided, record=record, progress=progress)
        final, history = out if record else (out, None)

        # 5. Decode (latents × float32(1/0.7), as the reference multiplies by the Python float 1/0.7).
        decode_input = final * np.float32(1 / self.vae.config.scaling_factor)
        decoded = self._vae_decode(self.vae.params, decode_input)
        frames = np.asarray(jnp.clip(decoded.astype(jnp.float32) * 0.5 + 0.5, 0, 1))[0]
        trace = None
        if record:
            names = ("negative_prompt", "prompt", "negative_prompt_mot_ref")
            trace = {f"input_ids.{n}": ids[i:i + 1] for i, n in enumerate(names)}
            trace["input_ids.prompt_mot_ref"] = ids[3:]
            trace.update(negative_prompt_embeds=neg, prompt_embeds=pos, negative_prompt_embeds_mot_ref=neg_ref,
                         prompt_embeds_mot_ref=ref_text_pos, image_latents=image_latents,
                         ref_video_latents=jnp.concatenate(ref_latents, 1),
                         ref_video_image_latents=jnp.concatenate(ref_first, 1),
                         latents_init=x, timesteps=steps.timestep, final_latents=final, vae_decode_input=decode_input,
                         vae_decode_output=decoded, frames=frames[None],
                         **{"transformer_in.encoder_hidden_states": text,
                            "transformer_in.encoder_hidden_states_mot_ref": ref_text,
                            "transformer_in.hidden_states_mot_ref": ref_in,
                            "steps.guidance_scale": scales,
                            "steps.timestep": np.repeat(steps.timestep[:, None], text.shape[0], 1)},
                         **{f"vae_encode.{k}": v for k, v in raw.items()},
                         **{f"steps.{k}": v for k, v in history.items()})
            trace = {k: np.asarray(v) for k, v in trace.items()}
        return Output(frames=frames, latents=np.asarray(final), trace=trace)


def _denoise(cfg, params, latents, image_in, ref_in, text, ref_text, steps, scales, *, guided, record, progress):
    """The DDIM loop; the model sees [x (twice when guided) | image latents] and the reference input."""
    model = cogvideox.CogVideoXTransformer(cfg)

    def denoise(x, t, i):
        xin = jnp.concatenate([jnp.concatenate([x] * 2) if guided else x, image_in], axis=-1)
        v = model.apply({"params": params}, xin, text, jnp.full((xin.shape[0],), t), ref_in, ref_text)
        v = v.astype(jnp.float32)
        out = sampling.guide(v[:1], v[1:], scales[i]) if guided else v
        return (out, {"noise_pred": v, "noise_pred_guided": out, "latent_model_input": xin}) if record else out

    return sampling.sample_loop(denoise, latents, steps, progress=progress, record=record)


def _require_pipeline_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"{path}: no such checkpoint folder")
    if not os.path.exists(os.path.join(path, "pipeline.json")):
        hint = ("it is a diffusers folder: convert it first with python -m convert "
                f"{path} OUT_DIR" if os.path.exists(os.path.join(path, "model_index.json"))
                else "convert a diffusers pipeline folder with python -m convert SRC OUT_DIR")
        raise checkpoint.CheckpointError(f"{path}: not a converted vapjax pipeline ({hint})")
