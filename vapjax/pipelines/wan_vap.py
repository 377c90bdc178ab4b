"""Video-As-Prompt generation with Wan2.1-I2V: image + one reference video + captions -> video.

What the official `WanImageToVideoMOTPipeline` computes (spec §4.2, §5.2; WPIPE = its file):
1. Reference frames chosen "evenly" (floor(linspace) over the reference's length, repeating frames of a
   short one), "first" or "random" (WPIPE:731-743). Exactly one reference: the official model asserts it.
2. UMT5 on the prompt, the negative prompt, the reference caption and the negative reference caption:
   cleaned, masked, zero past each caption's length, 512 tokens (WPIPE:182-221; `vapjax.text`).
3. CLIP (penultimate hidden states) of the input image and of the reference's first selected frame, both
   at their original size through the CLIPImageProcessor (WPIPE:722-756).
4. VAE posterior MODE, normalised per channel ((z − mean)·(1/std)), of: the reference clip; the
   reference's first frame followed by num_frames − 1 zero frames; the input image followed by zero
   frames. With the 4-channel first-frame mask these make the expert input [ref latents | mask | ref
   condition] and the target condition [mask | condition] (`vapjax.conditioning.wan`, WPIPE:369-499).
5. UniPC (or flow-match Euler: whatever the checkpoint's scheduler folder names) with classifier-free
   guidance as two transformer calls per step, conditional first: the unconditional call swaps BOTH
   captions for the negative ones and keeps the reference latents and both CLIP embeddings. The expert's
   timestep is the constant 1 (WPIPE:812-813). noise = u + g·(c − u) in the model's output dtype.
6. Latents stay float32 between steps; the model input [latents | condition] is cast to the
   transformer's dtype every step (WPIPE:783, 807-810). Decode: z / (1/std) + mean, VAE decode (clamped
   to [-1, 1]), frames = x/2 + 1/2.
Everything runs in JAX; the denoising loop is one `lax.scan` inside one `jit`. Intermediates go to an
optional `recorder`. Dtypes follow the official inference script (infer/wan_vap.py): transformer and
UMT5 in `dtype` (bf16 there), VAE and CLIP in float32.
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

from vapjax import checkpoint, conditioning, flow_sampling, sampling, text, video
from vapjax.clip_preprocess import CLIPPreprocessConfig
from vapjax.encoders import MAX_LENGTH_WAN, WanEncoders
from vapjax.models import clip, t5, wan, wan_vae
from vapjax.tree import flatten
from vapjax.memory import Stage
from vapjax.pipelines.common import Component, Output, Placement, Recorder, placement_for, require_pipeline_folder
from vapjax.prompts import DEFAULT_NEGATIVE_PROMPT
from vapjax.random_init import random_params
from vapjax.tokenizer import T5Tokenizer

REFERENCE_TIMESTEP = 1  # the expert sees its clean reference at t = 1 (WPIPE:812; the trainer too)
STATIC = ("guided", "record", "progress", "cfg_batch")  # the denoising loop's static arguments
# Wan2.1-I2V-14B-480P's text encoder (UMT5-XXL) and scheduler_config.json (spec §5.2).
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                per_layer_position_bias=True)
SCHEDULER = dict(_class_name="UniPCMultistepScheduler", prediction_type="flow_prediction", use_flow_sigmas=True,
                 flow_shift=3.0, solver_order=2, solver_type="bh2", lower_order_final=True,
                 final_sigmas_type="zero", num_train_timesteps=1000)


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: what to make and how (defaults: the official inference script infer/wan_vap.py)."""
    prompt: str
    ref_prompts: tuple[str, ...]       # exactly one caption: Wan-VAP takes one reference
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    negative_ref_prompt: str = DEFAULT_NEGATIVE_PROMPT
    height: int = 480
    width: int = 832
    num_frames: int = 49
    steps: int = 50
    guidance_scale: float = 5.0
    max_sequence_length: int = MAX_LENGTH_WAN   # the only length the official cross-attention takes
    frames_selection: str = "evenly"   # "evenly", "first" or "random" (video.select_reference_frames)
    seed: int = 0                      # initial noise and "random" frame selection


class WanVAP:
    """The pipeline's components and its jitted denoising loop. Build with `load(folder)` (a converted
    pipeline, see `python -m convert`) or `random(...)` (random weights, for demos and tests)."""

    def __init__(self, transformer: Component, encoders: WanEncoders, schedule,
                 placement: Placement | None = None):
        self.placement = placement or Placement()
        config = transformer.config.with_options(stream_layers=self.placement.stream, quantize=self.placement.quantize)
        self.transformer = Component(config, self.placement.params(transformer.params))
        self.encoders, self.schedule = encoders, schedule
        self._denoise = jax.jit(partial(_denoise, config), static_argnames=STATIC)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str, *, dtype: str | None = None, attention: str | None = None,
             tiling: bool = False, offload: str = "encoders",
             placement: Placement | None = None) -> "WanVAP":
        """A converted pipeline folder. `dtype` ("bfloat16"/"float32") sets the weights and compute of the
        transformer and UMT5 (default: as stored); the VAE and CLIP run in float32 as the official
        inference script loads them. `attention` picks the transformer's dot_product_attention implementation
        (default: the automatic choice; at 480x832 only a flash-style one fits: "cudnn" or "blockwise"). `offload` (`vapjax.memory.OFFLOAD_MODES`): which
        weights live on the host between uses."""
        require_pipeline_folder(path)
        placement = placement_for(offload, placement)
        # Encoders first: their host copies are made before the transformer takes the device.
        encoders = WanEncoders.load(path, dtype=dtype, tiling=tiling, offload=offload != "none")
        # Read as the dtypes the model declares (`checkpoint.load(dtype=)` would cast the float32 islands of
        # the official bf16 inference, time embedders, modulation tables, norms, too), straight into the
        # placement (Placement.restore).
        tpath, options, dtypes = os.path.join(path, "transformer"), {"attention": attention} if attention else {}, None
        if dtype is not None:
            options.update(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
            declared = flatten(wan.param_shapes(checkpoint.read_config(tpath, "wan_transformer").with_options(**options)))
            dtypes = lambda names: declared[names].dtype  # noqa: E731
        tcfg, tparams = placement.restore(tpath, "wan_transformer", dtypes=dtypes, **options)
        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            schedule = flow_sampling.schedule_from_config(json.load(f))
        return cls(Component(tcfg, tparams), encoders, schedule, placement)

    @classmethod
    def random(cls, transformer: wan.WanConfig, vae: wan_vae.VAEConfig, text_encoder: t5.T5Config,
               image_encoder: clip.CLIPVisionConfig, image_processor: CLIPPreprocessConfig, tokenizer: str | None,
               scheduler: dict, seed: int = 0, tiling: bool = False, offload: str = "encoders",
               abstract: bool = False, placement: Placement | None = None) -> "WanVAP":
        """Random weights (a demo that needs no download; outputs are noise-like, not meaningful).
        `abstract`: every weight a ShapeDtypeStruct instead (nothing allocated), for `stages`."""
        placement = placement_for(offload, placement)
        key = jax.random.PRNGKey(0)

        def init(fn, cfg, i):
            shapes = jax.eval_shape(partial(fn, cfg), key)
            return shapes if abstract else random_params(shapes, seed * 4 + i)

        encoders = WanEncoders(vae, init(wan_vae.init_params, vae, 1), text_encoder,
                               init(t5.init_params, text_encoder, 2),
                               T5Tokenizer.from_folder(tokenizer) if tokenizer else None,
                               image_encoder, init(clip.init_params, image_encoder, 3), image_processor,
                               tiling=wan_vae.Tiling() if tiling else None, offload=offload != "none")
        return cls(Component(transformer, init(wan.init_params, transformer, 0)), encoders,
                   flow_sampling.schedule_from_config(scheduler), placement)

    @classmethod
    def random_from_config(cls, m, *, dtype: str | None = None, attention: str | None = None,
                           tiling: bool = False, offload: str = "encoders", abstract: bool = False,
                           placement: Placement | None = None) -> "WanVAP":
        """`random` from a sample config's `model` section (see configs/wan_vap_tiny.py); `m=None`: the
        released model's architecture (Wan2.1-I2V-14B + VAP d10, its VAE, UMT5-XXL, CLIP ViT-H/14)."""
        dt = dtype or "float32"
        sizes = lambda part, default=None: m[part].to_dict() if m is not None else dict(default or {})  # noqa: E731
        return cls.random(
            wan.WanConfig(**sizes("transformer"), dtype=dt, param_dtype=dt, attention=attention),
            wan_vae.VAEConfig(**sizes("vae")), t5.T5Config(**sizes("text_encoder", UMT5_XXL), dtype=dt, param_dtype=dt),
            clip.CLIPVisionConfig(**sizes("image_encoder")), CLIPPreprocessConfig(**sizes("image_processor")),
            m.tokenizer if m is not None else None, m.scheduler.to_dict() if m is not None else SCHEDULER,
            seed=m.seed if m is not None else 0, tiling=tiling, offload=offload, abstract=abstract, placement=placement)

    @classmethod
    def abstract_load(cls, path: str, *, dtype: str | None = None, attention: str | None = None,
                      tiling: bool = False, offload: str = "encoders",
                      placement: Placement | None = None) -> "WanVAP":
        """A converted folder's models as `load` would configure them, with abstract weights (only the
        configs are read), for `stages`."""
        require_pipeline_folder(path)

        def cfg(sub, kind, dt=None, **options):
            c = checkpoint.read_config(os.path.join(path, sub), kind)
            dt = {"dtype": jnp.dtype(dt).name, "param_dtype": jnp.dtype(dt).name} if dt else {}
            return type(c).from_dict({**c.to_dict(), **dt, **options})

        with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
            scheduler = json.load(f)
        pre = CLIPPreprocessConfig.from_file(os.path.join(path, "image_processor", "preprocessor_config.json"))
        return cls.random(cfg("transformer", "wan_transformer", dtype, **({"attention": attention} if attention else {})),
                          cfg("vae", "wan_vae", "float32"), cfg("text_encoder", "t5_encoder", dtype),
                          cfg("image_encoder", "clip_vision", "float32"), pre, None, scheduler, tiling=tiling,
                          offload=offload, abstract=True, placement=placement)

    # -- memory ------------------------------------------------------------------------------------

    def stages(self, req: Request, num_refs: int = 1) -> list[Stage]:
        """The jitted stages of one generation of `req`'s size, with abstract inputs (`vapjax.memory`
        compiles them for a dry run): UMT5 on the four captions, CLIP on two images, the VAE on one clip,
        the whole denoising loop, the VAE decode."""
        del num_refs  # always one
        tcfg, vae, enc = self.transformer.config, self.encoders.vae_config, self.encoders
        dtype, S = jnp.dtype(tcfg.dtype), jax.ShapeDtypeStruct
        ids = S((4, req.max_sequence_length), jnp.int32)
        pre = enc.clip_preprocess
        pixels = S((2, pre.crop_height, pre.crop_width, 3), jnp.float32)
        clip_fn = partial(clip._penultimate, enc.clip_config)
        umt5 = partial(text._encode, enc.text_config)
        frames = S((1, req.num_frames, req.height, req.width, 3), jnp.float32)
        z = jax.eval_shape(enc._posterior, enc._vae_params, frames).mean
        z = S(z.shape, jnp.float32)
        caption = S((1,) + jax.eval_shape(umt5, enc._text_params, ids, ids).shape[1:], dtype)
        image = S((1,) + jax.eval_shape(clip_fn, enc._clip_params, pixels).shape[1:], dtype)
        cond = jax.eval_shape(partial(conditioning.wan, mask_channels=vae.temporal_compression), z, z, z,
                              caption, caption, image, image)
        steps = jax.tree.map(lambda a: S(np.shape(a), np.asarray(a).dtype), self.schedule.steps(req.steps))
        guided = req.guidance_scale > 1.0
        denoise = (self.transformer.params, z, cond["condition"], cond["ref_latents"], caption, caption, caption,
                   caption, image, image, steps, S((), jnp.float32))
        return [
            Stage("text encoder (UMT5)", "text_encoder", umt5, (enc._text_params, ids, ids)),
            Stage("image encoder (CLIP)", "image_encoder", clip_fn, (enc._clip_params, pixels)),
            Stage("VAE encode (one clip)", "vae", enc._posterior, (enc._vae_params, frames)),
            Stage(f"denoise ({req.steps} steps, {2 if guided else 1} calls/step)", "transformer", self._denoise,
                  denoise, dict(guided=guided, record=False, progress=None, cfg_batch=self.placement.data_parallel)),
            Stage("VAE decode", "vae", enc._decode, (enc._vae_params, S(z.shape, vae.dtype))),
        ]

    # -- generation --------------------------------------------------------------------------------

    def validate(self, image: np.ndarray, ref_videos: Sequence[np.ndarray], req: Request) -> None:
        """One-line errors for requests the model cannot serve."""
        c, vae = self.transformer.config, self.encoders.vae_config
        ratio = vae.temporal_compression
        if req.num_frames < 1 or (req.num_frames - 1) % ratio:
            raise ValueError(f"num_frames={req.num_frames}: must be {ratio}k+1 (e.g. 49)")
        unit = vae.spatial_compression * c.patch_size[1]
        if req.height % unit or req.width % unit or req.height <= 0 or req.width <= 0:
            raise ValueError(f"{req.height}x{req.width}: height and width must be positive multiples of {unit}")
        if len(ref_videos) != 1:
            raise ValueError(f"{len(ref_videos)} reference videos: Wan-VAP takes exactly one (the official "
                             "model asserts num_mot_ref == 1)")
        if len(req.ref_prompts) != len(ref_videos):
            raise ValueError(f"{len(ref_videos)} reference video but {len(req.ref_prompts)} reference prompts")
        if not c.expert_layers:
            raise ValueError("this checkpoint has no VAP expert (a stock Wan transformer)")
        if req.max_sequence_length != MAX_LENGTH_WAN:
            raise ValueError(f"max_sequence_length={req.max_sequence_length}: Wan's cross-attention takes "
                             f"exactly {MAX_LENGTH_WAN} caption tokens")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
        for i, v in enumerate(ref_videos):
            if v.ndim != 4 or v.shape[-1] != 3:
                raise ValueError(f"reference video {i} must be [F, H, W, 3] RGB, got shape {v.shape}")
        video.check_reference_lengths([len(v) for v in ref_videos], req.num_frames, req.frames_selection)

    def __call__(self, image: np.ndarray, ref_videos: Sequence[np.ndarray], req: Request, *,
                 latents: np.ndarray | None = None, recorder: Recorder | None = None,
                 progress: Callable[[Any], None] | None = None) -> Output:
        """image uint8 [H, W, 3]; ref_videos: one uint8 [F, H, W, 3]; `latents` overrides the initial
        noise [1, f, h, w, C]; `recorder(name, value)` is handed every intermediate."""
        self.validate(image, ref_videos, req)
        record = recorder or (lambda name, value: None)
        tcfg, vae, enc = self.transformer.config, self.encoders.vae_config, self.encoders
        dtype = jnp.dtype(tcfg.dtype)
        h, w, f = req.height, req.width, req.num_frames

        # 1. Reference frames (spec §4.2).
        (pick,) = video.select_reference_frames([len(ref_videos[0])], f, req.frames_selection, seed=req.seed)
        ref = ref_videos[0][pick]
        record("reference_frames.0", pick)

        # 2. Captions (UMT5), then 3. CLIP; both encoders leave the device afterwards (offload).
        texts = [req.prompt, req.negative_prompt, req.ref_prompts[0], req.negative_ref_prompt]
        ids, mask = enc.tokenize(texts, req.max_sequence_length)
        emb = enc.encode_text(texts, req.max_sequence_length).astype(dtype)
        pos, neg, pos_ref, neg_ref = (emb[i:i + 1] for i in range(4))
        pixels = np.concatenate([enc.image_pixels(image[None]), enc.image_pixels(ref[:1])])  # own sizes
        clip_states = enc.image_embeds(pixels)
        image_embeds, ref_image_embeds = clip_states[:1].astype(dtype), clip_states[1:].astype(dtype)

        # 4. VAE modes, normalised: reference clip, [reference first frame, zeros…], [image, zeros…].
        def pixels_of(frames):
            return video.to_model_range(video.resize(frames, h, w))[None]

        def first_frame_clip(frame):
            x = pixels_of(frame[None])
            return np.concatenate([x, np.zeros((1, f - 1) + x.shape[2:], np.float32)], axis=1)

        modes = {"ref_video": enc.mode(pixels_of(ref)), "ref_condition": enc.mode(first_frame_clip(ref[0])),
                 "image_condition": enc.mode(first_frame_clip(image))}
        norm = {k: vae.normalize(v.astype(jnp.float32)) for k, v in modes.items()}
        cond = conditioning.wan(norm["image_condition"], norm["ref_video"], norm["ref_condition"], pos, pos_ref,
                                image_embeds, ref_image_embeds, mask_channels=vae.temporal_compression)

        # 5. Denoise: float32 latents, the model input in the compute dtype.
        steps = self.schedule.steps(req.steps)
        guided = req.guidance_scale > 1.0
        shape = cond["condition"].shape[:4] + (tcfg.out_channels,)
        if latents is None:
            x = jax.random.normal(jax.random.PRNGKey(req.seed), shape, jnp.float32)
        else:
            x = jnp.asarray(latents)
            if x.shape != shape:
                raise ValueError(f"latents of shape {x.shape}, expected {shape}")
            x = x.astype(jnp.float32)
        at = self.placement  # one device, or the mesh: CFG halves over `data`, heads or tokens over `tensor`
        with at.context():
            out = self._denoise(self.transformer.params, *map(at.replicated, (
                                x, cond["condition"], cond["ref_latents"], pos, neg, pos_ref, neg_ref, image_embeds,
                                ref_image_embeds)), steps, jnp.float32(req.guidance_scale), guided=guided,
                                record=recorder is not None, progress=progress, cfg_batch=at.data_parallel)
        final, history = at.gather(out) if recorder is not None else (at.gather(out), {})

        # 6. Decode.
        decoded = enc.decode(final)
        frames = np.asarray(jnp.clip(decoded.astype(jnp.float32) * 0.5 + 0.5, 0, 1))[0]

        if recorder is not None:
            c = vae.z_dim
            names = ("prompt", "negative_prompt", "prompt_mot_ref", "negative_prompt_mot_ref")
            for name, value in {
                **{f"input_ids.{n}": ids[i:i + 1] for i, n in enumerate(names)},
                **{f"attention_mask.{n}": mask[i:i + 1] for i, n in enumerate(names)},
                "prompt_embeds": pos, "negative_prompt_embeds": neg, "prompt_embeds_mot_ref": pos_ref,
                "negative_prompt_embeds_mot_ref": neg_ref,
                "clip_pixel_values.image": pixels[:1], "clip_pixel_values.ref_first_frame": pixels[1:],
                "clip_penultimate.image": clip_states[:1], "clip_penultimate.ref_first_frame": clip_states[1:],
                **{f"vae_encode_mode.{k}": v for k, v in modes.items()},
                "latents_mot_ref": norm["ref_video"], "condition": cond["condition"],
                "condition_mot_ref": cond["ref_latents"][..., c:],
                "transformer_in.hidden_states_mot_ref": cond["ref_latents"],
                "transformer_in.encoder_hidden_states": pos, "transformer_in.negative_encoder_hidden_states": neg,
                "transformer_in.encoder_hidden_states_mot_ref": pos_ref,
                "transformer_in.negative_encoder_hidden_states_mot_ref": neg_ref,
                "transformer_in.encoder_hidden_states_image": image_embeds,
                "transformer_in.encoder_hidden_states_image_mot_ref": ref_image_embeds,
                "transformer_in.timestep_mot_ref": np.full((1, 1), REFERENCE_TIMESTEP),
                "latents_init": x, "timesteps": steps.timestep, "scheduler.sigmas": self.schedule.sigmas(req.steps),
                "steps.timestep": np.asarray(steps.timestep)[:, None],
                **{f"steps.{k}": v for k, v in history.items()},
                "final_latents": final, "vae_decode_input": vae.denormalize(final), "frames": frames[None],
            }.items():
                record(name, np.asarray(value))
        return Output(frames=frames, latents=np.asarray(final))


def _denoise(cfg, params, latents, condition, ref_input, text, neg_text, ref_text, neg_ref_text, image, ref_image,
             steps, scale, *, guided, record, progress, cfg_batch=False):
    """The flow-matching loop; each step the model sees [x | mask | condition] in its compute dtype.
    Guided, the two calls of a step (conditional, then unconditional: both captions negative) run one
    after the other as a `lax.map` over the caption pairs, so the model is traced and compiled once;
    `cfg_batch` runs them as one batch of two instead (split over a mesh's `data` axis)."""
    model = wan.WanTransformer(cfg)
    dtype = jnp.dtype(cfg.dtype)
    ref_input = ref_input.astype(dtype)
    captions = [(text, ref_text)] + ([(neg_text, neg_ref_text)] if guided else [])
    captions = jax.tree.map(lambda *a: jnp.stack(a), *captions)

    def call(xin, t, c):
        return model.apply({"params": params}, xin, c[0], image, jnp.full((xin.shape[0],), t), ref_input, c[1],
                           ref_image, REFERENCE_TIMESTEP)

    def denoise(x, t, i):
        xin = jnp.concatenate([x, condition], axis=-1).astype(dtype)
        if cfg_batch and guided:  # [cond; uncond] as one batch: everything but the captions repeated
            two = lambda a: jnp.concatenate([a, a])  # noqa: E731
            merged = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), captions)
            pred = model.apply({"params": params}, two(xin), merged[0], two(image), jnp.full((2,), t),
                               two(ref_input), merged[1], two(ref_image), REFERENCE_TIMESTEP)[:, None]
        else:
            pred = jax.lax.map(lambda c: call(xin, t, c), captions)
        cond = pred[0]
        out = sampling.guide(pred[1], cond, scale) if guided else cond
        aux = {"noise_pred_cond": cond, "noise_pred_guided": out, "latent_model_input": xin}
        if guided:
            aux["noise_pred_uncond"] = pred[1]
        return (out, aux) if record else out

    return flow_sampling.sample_loop(denoise, latents, steps, progress=progress, record=record)
