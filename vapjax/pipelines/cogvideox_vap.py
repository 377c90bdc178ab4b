"""Video-As-Prompt generation with CogVideoX-I2V: image + reference video(s) + captions -> video.

What the official `CogVideoXImageToVideoMOTPipeline` computes (spec §4.1, §5.1):
1. Reference frames chosen "evenly": floor(linspace) over the FIRST reference's length for every
   reference (repeating frames of a short one), or "first" / "random"; every frame resized.
2. VAE encodes, each ×scaling_factor (0.7): the target image (one latent frame, zero-padded to the
   video's latent length) → the image condition; each reference video → its latents; each reference's
   first frame alone (zero-padded) → its first-frame condition. Expert input per reference:
   [reference latents | first-frame latents] on channels; references concatenated on frames.
3. T5 on the prompt, the negative prompt and each reference caption (padded to L, no mask).
4. DDIM (v-prediction) with classifier-free guidance in one batch [uncond, cond]: the unconditional
   half swaps BOTH the target caption and the reference captions for the negative prompt, and keeps
   the reference video. Optional dynamic CFG (the official formula, quirks included).
5. Decode latents ÷ scaling_factor; frames = clip(x/2 + 1/2, 0, 1).
Everything runs in JAX; the denoising loop is one `lax.scan` inside one `jit`. Latents stay in the
compute dtype: given ones are cast before the first step, and every step's result after it (CPIPE:1057).
The VAE and T5 are the same `Encoders` the latent precompute uses; the conditioning inputs come from
`vapjax.conditioning.cogvideox`, as in training. Intermediates go to an optional `recorder`.
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

from vapjax import checkpoint, conditioning, sampling, video
from vapjax.encoders import Encoders
from vapjax.models import cogvideox, cogvideox_vae, t5
from vapjax.memory import Stage
from vapjax.pipelines.common import Component, Output, Placement, Recorder, placement_for, require_pipeline_folder
from vapjax.prompts import DEFAULT_NEGATIVE_PROMPT
from vapjax.random_init import random_params
from vapjax.tokenizer import T5Tokenizer

MAX_REFERENCES = 3
STATIC = ("guided", "record", "progress")  # the denoising loop's static arguments
# CogVideoX-5B-I2V's scheduler_config.json (spec §5.1).
SCHEDULER = dict(_class_name="CogVideoXDDIMScheduler", beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", num_train_timesteps=1000, prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0, steps_offset=0,
                 timestep_spacing="trailing", clip_sample=False)


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
    frames_selection: str = "evenly"   # "evenly", "first" or "random" (video.select_reference_frames)
    # "evenly" over each reference's own length instead of the first reference's (NOT the official behaviour).
    frames_per_reference_length: bool = False
    posterior: str = "sample"          # VAE encodes: "sample" (official) or "mode"
    seed: int = 0                      # noise, posterior samples and "random" frame selection


class CogVideoXVAP:
    """The pipeline's components and its jitted stages. Build with `load(folder)` (a converted
    pipeline, see `python -m convert`) or `random(...)` (random weights, for demos and tests)."""

    def __init__(self, transformer: Component, encoders: Encoders, schedule: sampling.DDIMSchedule,
                 placement: Placement | None = None):
        self.placement = placement or Placement()
        config = transformer.config.with_options(stream_layers=self.placement.stream, quantize=self.placement.quantize)
        self.transformer = Component(config, self.placement.params(transformer.params))
        self.encoders, self.schedule = encoders, schedule
        self._denoise = jax.jit(partial(_denoise, config), static_argnames=STATIC)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str, *, dtype: str | None = None, attention: str | None = None,
             tiling: bool = False, offload: str = "none",
             placement: Placement | None = None) -> "CogVideoXVAP":
        """A converted pipeline folder. `dtype` ("bfloat16"/"float32") sets weights and compute of all
        models (default: as stored); `attention` picks the dot_product_attention implementation;
        `offload` (`vapjax.memory.OFFLOAD_MODES`) which weights live on the host between uses."""
        require_pipeline_folder(path)
        placement = placement_for(offload, placement)
        tcfg, tparams = placement.restore(os.path.join(path, "transformer"), "cogvideox_transformer", dtype=dtype,
                                          attention=attention)
        encoders = Encoders.load(path, dtype=dtype, tiling=tiling, devices=jax.local_devices()[:1],
                                 offload=offload != "none")
        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            schedule = sampling.DDIMSchedule.from_config(json.load(f))
        return cls(Component(tcfg, tparams), encoders, schedule, placement)

    @classmethod
    def random(cls, transformer: cogvideox.CogVideoXConfig, vae: cogvideox_vae.VAEConfig, text_encoder: t5.T5Config,
               tokenizer: str | None, scheduler: dict, seed: int = 0, tiling: bool = False,
               offload: str = "none", abstract: bool = False,
               placement: Placement | None = None) -> "CogVideoXVAP":
        """Random weights (a demo that needs no download; outputs are noise-like, not meaningful).
        `abstract`: every weight a ShapeDtypeStruct instead (nothing allocated), for `stages`."""
        placement = placement_for(offload, placement)
        key = jax.random.PRNGKey(0)

        def init(fn, cfg, i):
            shapes = jax.eval_shape(partial(fn, cfg), key)
            return shapes if abstract else random_params(shapes, seed * 3 + i)

        encoders = Encoders(vae, init(cogvideox_vae.init_params, vae, 1), text_encoder,
                            init(t5.init_params, text_encoder, 2),
                            T5Tokenizer.from_folder(tokenizer) if tokenizer else None,
                            tiling=cogvideox_vae.Tiling.default(vae) if tiling else None,
                            devices=jax.local_devices()[:1], offload=offload != "none")
        return cls(Component(transformer, init(cogvideox.init_params, transformer, 0)), encoders,
                   sampling.DDIMSchedule.from_config(scheduler), placement)

    @classmethod
    def random_from_config(cls, m, *, dtype: str | None = None, attention: str | None = None,
                           tiling: bool = False, offload: str = "none", abstract: bool = False,
                           placement: Placement | None = None) -> "CogVideoXVAP":
        """`random` from a sample config's `model` section (see configs/cog_vap_tiny.py); `m=None`: the
        released model's architecture (CogVideoX-5B-I2V + VAP, its VAE, T5-XXL, its scheduler)."""
        dt = dtype or "float32"
        sizes = lambda part: m[part].to_dict() if m is not None else {}  # noqa: E731
        return cls.random(cogvideox.CogVideoXConfig(**sizes("transformer"), dtype=dt, param_dtype=dt,
                                                    attention=attention),
                          cogvideox_vae.VAEConfig(**sizes("vae"), dtype=dt, param_dtype=dt),
                          t5.T5Config(**sizes("text_encoder"), dtype=dt, param_dtype=dt),
                          m.tokenizer if m is not None else None,
                          m.scheduler.to_dict() if m is not None else SCHEDULER, seed=m.seed if m is not None else 0,
                          tiling=tiling, offload=offload, abstract=abstract, placement=placement)

    @classmethod
    def abstract_load(cls, path: str, *, dtype: str | None = None, attention: str | None = None,
                      tiling: bool = False, offload: str = "none",
                      placement: Placement | None = None) -> "CogVideoXVAP":
        """A converted folder's models as `load` would configure them, with abstract weights (only the
        configs are read), for `stages`."""
        require_pipeline_folder(path)
        def cfg(sub, kind, **options):
            c = checkpoint.read_config(os.path.join(path, sub), kind)
            dt = {"dtype": jnp.dtype(dtype).name, "param_dtype": jnp.dtype(dtype).name} if dtype else {}
            return type(c).from_dict({**c.to_dict(), **dt, **options})

        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            scheduler = json.load(f)
        return cls.random(cfg("transformer", "cogvideox_transformer", attention=attention),
                          cfg("vae", "cogvideox_vae"), cfg("text_encoder", "t5_encoder"), None, scheduler,
                          tiling=tiling, offload=offload, abstract=True, placement=placement)

    # -- memory ------------------------------------------------------------------------------------

    def stages(self, req: Request, num_refs: int = 1) -> list[Stage]:
        """The jitted stages of one generation of `req`'s size, with abstract inputs (`vapjax.memory`
        compiles them for a dry run): T5 on every caption, the VAE on a reference clip (the largest
        encode), the whole denoising loop, the VAE decode."""
        tcfg, vae, enc = self.transformer.config, self.encoders.vae_config, self.encoders
        dtype, S = jnp.dtype(tcfg.dtype), jax.ShapeDtypeStruct
        n = 2 if req.guidance_scale > 1.0 else 1
        ids = S((3 + num_refs, req.max_sequence_length), jnp.int32)
        clip = S((1, req.num_frames, req.height, req.width, 3), jnp.float32)
        latents = jax.eval_shape(enc._posterior, enc._vae_params, clip).mean
        text = jax.eval_shape(enc._t5, enc._text_params, ids)
        like = lambda shape: S(shape, dtype)  # noqa: E731
        z = latents.shape[1:]
        cond = jax.eval_shape(conditioning.cogvideox, like((n, 1) + z[1:]), like((n, num_refs) + z),
                              like((n, num_refs, 1) + z[1:]), like((n,) + text.shape[1:]),
                              like((n, num_refs) + text.shape[1:]))
        steps = jax.tree.map(lambda a: S(np.shape(a), np.asarray(a).dtype), self.schedule.steps(req.steps))
        denoise = (self.transformer.params, like(latents.shape), cond["image"], cond["ref_latents"], cond["text"],
                   cond["ref_text"], steps, S((req.steps,), jnp.float32))
        return [
            Stage("text encoder (T5)", "text_encoder", enc._t5, (enc._text_params, ids)),
            Stage("VAE encode (one clip)", "vae", enc._posterior, (enc._vae_params, clip)),
            Stage(f"denoise ({req.steps} steps, CFG batch {n})", "transformer", self._denoise, denoise,
                  dict(guided=n == 2, record=False, progress=None)),
            Stage("VAE decode", "vae", enc._decode, (enc._vae_params, S(latents.shape, jnp.float32))),
        ]

    # -- generation --------------------------------------------------------------------------------

    def validate(self, image: np.ndarray, ref_videos: Sequence[np.ndarray], req: Request) -> None:
        """One-line errors for requests the model cannot serve."""
        c, vae = self.transformer.config, self.encoders.vae_config
        ratio = vae.temporal_compression_ratio
        spatial = 2 ** (len(vae.block_out_channels) - 1)
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
        video.check_reference_lengths([len(v) for v in ref_videos], req.num_frames, req.frames_selection,
                                      req.frames_per_reference_length)
        if req.posterior not in ("sample", "mode"):
            raise ValueError(f"posterior={req.posterior!r}: 'sample' or 'mode'")

    def __call__(self, image: np.ndarray, ref_videos: Sequence[np.ndarray], req: Request, *,
                 latents: np.ndarray | None = None, recorder: Recorder | None = None,
                 progress: Callable[[Any], None] | None = None) -> Output:
        """image uint8 [H, W, 3]; ref_videos: uint8 [F, H, W, 3] each; `latents` overrides the initial
        noise [1, f, h, w, C]; `recorder(name, value)` is handed every intermediate."""
        self.validate(image, ref_videos, req)
        record = recorder or (lambda name, value: None)
        tcfg, vae, enc = self.transformer.config, self.encoders.vae_config, self.encoders
        dtype = jnp.dtype(tcfg.dtype)
        n_ref, h, w, f = len(ref_videos), req.height, req.width, req.num_frames

        # 1. Reference frames (spec §4.1), every frame resized to the output size.
        picks = video.select_reference_frames([len(v) for v in ref_videos], f, req.frames_selection, seed=req.seed,
                                              per_reference_length=req.frames_per_reference_length)
        refs = [v[ix] for v, ix in zip(ref_videos, picks)]
        for i, ix in enumerate(picks):
            record(f"reference_frames.{i}", ix)

        # 2. VAE latents × scaling_factor: the target image, each reference clip and its first frame alone.
        k_noise, k_image, *k_refs = jax.random.split(jax.random.PRNGKey(req.seed), 2 + 2 * n_ref)

        def encode(name, frames, key):
            post = enc.posterior(video.resize(frames, h, w)[None])
            z = post.mode() if req.posterior == "mode" else post.sample(key)
            record(f"vae_encode.{name}", z)
            return (z * vae.scaling_factor).astype(dtype)

        image_latents = encode("image", image[None], k_image)
        ref_latents = jnp.stack([encode(f"ref_video.{i}", r, k_refs[2 * i]) for i, r in enumerate(refs)], axis=1)
        ref_first = jnp.stack([encode(f"ref_first_frame.{i}", r[:1], k_refs[2 * i + 1])
                               for i, r in enumerate(refs)], axis=1)

        # 3. Text: T5 of [negative, prompt, negative reference caption, reference captions] (padded to L).
        L = req.max_sequence_length
        ids = enc.tokenize([req.negative_prompt, req.prompt, req.negative_ref_prompt, *req.ref_prompts], L)
        emb = enc.encode_ids(ids).astype(dtype)
        neg, pos, neg_ref, pos_refs = emb[0:1], emb[1:2], emb[2:3], emb[3:][None]

        # 4. Conditioning, one batch [uncond, cond] under guidance: the unconditional half swaps the target
        # AND the reference captions for the negative ones and keeps the reference video.
        guided = req.guidance_scale > 1.0
        halves = [(neg, jnp.repeat(neg_ref[None], n_ref, axis=1)), (pos, pos_refs)] if guided else [(pos, pos_refs)]
        batch = lambda z: jnp.concatenate([z] * len(halves))  # noqa: E731
        cond = conditioning.cogvideox(batch(image_latents), batch(ref_latents), batch(ref_first),
                                      jnp.concatenate([t for t, _ in halves]), jnp.concatenate([r for _, r in halves]))

        # 5. Denoise, in the compute dtype from the first step on.
        steps = self.schedule.steps(req.steps)
        scales = np.array([sampling.dynamic_cfg_scale(req.guidance_scale, t, req.steps) if req.dynamic_cfg
                           else req.guidance_scale for t in steps.timestep], np.float64)
        spatial = 2 ** (len(vae.block_out_channels) - 1)
        shape = (1, cond["image"].shape[1], h // spatial, w // spatial, tcfg.out_channels)
        if latents is None:
            x = jax.random.normal(k_noise, shape, dtype)
        else:
            x = jnp.asarray(latents)
            if x.shape != shape:
                raise ValueError(f"latents of shape {x.shape}, expected {shape}")
            x = x.astype(dtype)
        at = self.placement  # one device, or the mesh: CFG batch over `data`, heads or tokens over `tensor`
        with at.context():
            out = self._denoise(self.transformer.params, at.replicated(x), at.batch(cond["image"]),
                                at.batch(cond["ref_latents"]), at.batch(cond["text"]), at.batch(cond["ref_text"]),
                                steps, jnp.asarray(scales, jnp.float32), guided=guided,
                                record=recorder is not None, progress=progress)
        final, history = at.gather(out) if recorder is not None else (at.gather(out), {})

        # 6. Decode (latents × float32(1/0.7), as the reference multiplies by the Python float 1/0.7).
        decode_input = final * np.float32(1 / vae.scaling_factor)
        decoded = enc.decode(decode_input)
        frames = np.asarray(jnp.clip(decoded.astype(jnp.float32) * 0.5 + 0.5, 0, 1))[0]

        if recorder is not None:
            c = vae.latent_channels
            for name, value in {
                "input_ids.negative_prompt": ids[0:1], "input_ids.prompt": ids[1:2],
                "input_ids.negative_prompt_mot_ref": ids[2:3], "input_ids.prompt_mot_ref": ids[3:],
                "negative_prompt_embeds": neg, "prompt_embeds": pos, "negative_prompt_embeds_mot_ref": neg_ref,
                "prompt_embeds_mot_ref": cond["ref_text"][-1:], "image_latents": cond["image"][:1],
                "ref_video_latents": cond["ref_latents"][:1, ..., :c],
                "ref_video_image_latents": cond["ref_latents"][:1, ..., c:],
                "transformer_in.encoder_hidden_states": cond["text"],
                "transformer_in.encoder_hidden_states_mot_ref": cond["ref_text"],
                "transformer_in.hidden_states_mot_ref": cond["ref_latents"],
                "latents_init": x, "timesteps": steps.timestep, "steps.guidance_scale": scales,
                "steps.timestep": np.repeat(steps.timestep[:, None], len(halves), 1),
                **{f"steps.{k}": v for k, v in history.items()},
                "final_latents": final, "vae_decode_input": decode_input, "vae_decode_output": decoded,
                "frames": frames[None],
            }.items():
                record(name, np.asarray(value))
        return Output(frames=frames, latents=np.asarray(final))


def _denoise(cfg, params, latents, image_in, ref_in, text, ref_text, steps, scales, *, guided, record, progress):
    """The DDIM loop; the model sees [x (twice when guided) | image latents] and the reference input."""
    model = cogvideox.CogVideoXTransformer(cfg)

    def denoise(x, t, i):
        xin = jnp.concatenate([jnp.concatenate([x] * 2) if guided else x, image_in], axis=-1)
        v = model.apply({"params": params}, xin, text, jnp.full((xin.shape[0],), t), ref_in, ref_text)
        v = v.astype(jnp.float32)
        out = sampling.guide(v[:1], v[1:], scales[i]) if guided else v
        return (out, {"noise_pred": v, "noise_pred_guided": out, "latent_model_input": xin}) if record else out

    return sampling.sample_loop(denoise, latents, steps, dtype=jnp.dtype(cfg.dtype), progress=progress, record=record)
