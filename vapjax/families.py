"""Model families (CogVideoX, Wan) as entries of one table, never as `if family == ...`.

A family names what differs between them for the entry points:

  transformer_kind  the `vapjax.checkpoint.KINDS` key of its diffusion transformer (VAP model); its
                    config class is `checkpoint.KINDS[transformer_kind]`
  pipeline          the generation pipeline class: `Pipeline.load(folder, dtype=, attention=, tiling=)`
                    (or `Pipeline.random_from_config(model_section, ...)`) returns a callable
                    `pipe(image, ref_videos, request)`; `Pipeline.validate(image, ref_videos, request)`
                    checks a request before any weights are used
  request           the pipeline's Request dataclass (sample.py fills its fields from a config)
  objective         `objective(train_config, model_config) -> objective(params, batch, rng, empty_text)
                    -> loss`, the training objective `vapjax.training.make_train_step` takes
  param_shapes      model config -> the transformer's parameter tree as ShapeDtypeStructs (random init)
  synthetic_data    `(train_config, model_config) -> (iterator, empty-caption embedding)`: a fixed random
                    dataset in the family's batch format (`vapjax.data.random_latents`)
  text_length       `(train_config, model_config) -> int`: the caption length the data path encodes to
  sequence_length   `(model_config, batch) -> int`: tokens of one sample's joint attention (throughput)
  convert_hint      how to make a trainable checkpoint (expert initialised) from the stock one
  unfreeze          `model_config -> regex` of what the model's structure trains beyond the default
                    trainable partitions (`vapjax.training.is_trainable`), e.g. a single-branch finetune
  dpo_objective     like `objective` for recipe "dpo" (params = {'policy', 'reference'}, batches of
                    (win, lose) pairs), or None where the official code has no DPO (Wan)
  dpo_synthetic     like `synthetic_data`, in the DPO pair format, or None

A family is one entry here, next to its converter (`convert/__main__.py` MODELS, `convert/pipeline.py`
PIPELINES), its checkpoint kind (`vapjax.checkpoint.KINDS`) and its training features
(`vapjax.data.features.FEATURES`, chosen by the pipeline's VAE kind). `sample.py` and `train.py` look
the family up by name (`get(c.family)`) or from a converted folder (`of_checkpoint(path)`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from vapjax import checkpoint, sampling, training
from vapjax.data.random_latents import RandomDPOPairs, RandomLatents, RandomWanLatents
from vapjax.models import cogvideox, wan
from vapjax.pipelines import cogvideox_vap, wan_vap


@dataclasses.dataclass(frozen=True)
class Family:
    transformer_kind: str
    pipeline: type
    request: type                      # the pipeline's Request dataclass
    objective: Callable[[Any, Any], Callable]
    param_shapes: Callable[[Any], Any]
    synthetic_data: Callable[[Any, Any], tuple[Any, np.ndarray]]
    text_length: Callable[[Any, Any], int]
    sequence_length: Callable[[Any, Mapping[str, np.ndarray]], int]
    convert_hint: str
    unfreeze: Callable[[Any], str] = lambda cfg: ""
    dpo_objective: Callable[[Any, Any], Callable] | None = None
    dpo_synthetic: Callable[[Any, Any], tuple[Any, np.ndarray]] | None = None


def _cogvideox_objective(c, cfg: cogvideox.CogVideoXConfig) -> Callable:
    """v-prediction DDIM (spec §7.3) with the schedule, scaling factor and caption dropout of config `c`."""
    schedule = sampling.DDIMSchedule.from_config(c.scheduler.to_dict())
    ref_noise = c.get("ref_noise", False)
    if ref_noise and not cfg.ref_head:
        raise ValueError("ref_noise=True trains the reference's own prediction: set model.ref_head=True (the "
                         "expert's output head, initialised from the backbone's)")
    return training.cogvideox_objective(cogvideox.CogVideoXTransformer(cfg), schedule.alphas_cumprod,
                                        scaling_factor=c.scaling_factor, caption_dropout=c.caption_dropout,
                                        dtype=jnp.dtype(cfg.dtype), ref_noise=ref_noise,
                                        ref_noise_steps=c.get("ref_noise_steps", 1000),
                                        ref_noise_adaln=c.get("ref_noise_adaln", False), num_refs=c.data.num_refs)


def _cogvideox_dpo_objective(c, cfg: cogvideox.CogVideoXConfig) -> Callable:
    """Diffusion-DPO (spec §7.8) on the §7.3 losses, with the config's β, scaling factor and caption dropout."""
    schedule = sampling.DDIMSchedule.from_config(c.scheduler.to_dict())
    return training.cogvideox_dpo_objective(cogvideox.CogVideoXTransformer(cfg), schedule.alphas_cumprod,
                                            scaling_factor=c.scaling_factor, caption_dropout=c.caption_dropout,
                                            dtype=jnp.dtype(cfg.dtype), beta=c.dpo.beta)


def _cogvideox_dpo_synthetic(c, cfg: cogvideox.CogVideoXConfig):
    data = RandomDPOPairs(size=c.data.size, batch_size=c.batch_size, frames=cfg.latent_frames,
                          height=cfg.sample_height, width=cfg.sample_width, channels=cfg.out_channels,
                          text_len=cfg.max_text_seq_length, text_dim=cfg.text_embed_dim, seed=c.data.seed)
    return data, data.empty_text


def _cogvideox_synthetic(c, cfg: cogvideox.CogVideoXConfig):
    data = RandomLatents(size=c.data.size, batch_size=c.batch_size, frames=cfg.latent_frames,
                         height=cfg.sample_height, width=cfg.sample_width, channels=cfg.out_channels,
                         text_len=cfg.max_text_seq_length, text_dim=cfg.text_embed_dim,
                         num_refs=c.data.num_refs, seed=c.data.seed)
    return data, data.empty_text


def _cogvideox_sequence(cfg: cogvideox.CogVideoXConfig, batch) -> int:
    """[caption ; video] of the target and of each reference."""
    f, h, w = np.shape(batch["latent_dist"])[-4:-1]   # also for DPO pairs [P, 2, f, h, w, 2C]
    return (cfg.max_text_seq_length + f * h * w // cfg.patch_size ** 2) * (1 + np.shape(batch["ref_text"])[1])


def _wan_objective(c, cfg: wan.WanConfig) -> Callable:
    """Flow matching (spec §7.4) with the caption dropout of config `c`; the expert at reference timestep 1."""
    return training.wan_objective(wan.WanTransformer(cfg), caption_dropout=c.caption_dropout,
                                  dtype=jnp.dtype(cfg.dtype))


def _wan_synthetic(c, cfg: wan.WanConfig):
    """Latent clips of c.data.latent_size (f, h, w), captions of c.data.text_len, CLIP of c.data.image_len."""
    f, h, w = c.data.latent_size
    data = RandomWanLatents(size=c.data.size, batch_size=c.batch_size, frames=f, height=h, width=w,
                            channels=cfg.out_channels, text_len=c.data.text_len, text_dim=cfg.text_dim,
                            image_len=c.data.image_len, image_dim=cfg.image_dim, num_refs=c.data.num_refs,
                            seed=c.data.seed)
    return data, data.empty_text


def _wan_sequence(cfg: wan.WanConfig, batch) -> int:
    """[target video ; reference video] (Wan's joint self-attention has no text)."""
    grid = [n // p for n, p in zip(np.shape(batch["latent_dist"])[1:4], cfg.patch_size)]
    return 2 * int(np.prod(grid))


FAMILIES: dict[str, Family] = {
    "cogvideox": Family(
        transformer_kind="cogvideox_transformer", pipeline=cogvideox_vap.CogVideoXVAP, request=cogvideox_vap.Request,
        objective=_cogvideox_objective,
        param_shapes=cogvideox.param_shapes, synthetic_data=_cogvideox_synthetic,
        text_length=lambda c, cfg: cfg.max_text_seq_length, sequence_length=_cogvideox_sequence,
        convert_hint="python -m convert CogVideoX-5b-I2V/transformer OUT --init-expert copy --expert-layers 0-40",
        unfreeze=cogvideox.structure_unfreeze,
        dpo_objective=_cogvideox_dpo_objective, dpo_synthetic=_cogvideox_dpo_synthetic),
    "wan": Family(
        transformer_kind="wan_transformer", pipeline=wan_vap.WanVAP, request=wan_vap.Request, objective=_wan_objective,
        param_shapes=wan.param_shapes, synthetic_data=_wan_synthetic,
        text_length=lambda c, cfg: c.data.text_len, sequence_length=_wan_sequence,
        convert_hint="python -m convert Wan2.1-I2V-14B-480P-Diffusers/transformer OUT --init-expert copy "
                     "--expert-layers 0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30,32,34,36,38"),
}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def of_checkpoint(path: str) -> str:
    """The family of a converted transformer folder, or of a converted pipeline folder (its transformer/)."""
    if os.path.exists(os.path.join(path, "pipeline.json")):
        path = os.path.join(path, "transformer")
    kind = checkpoint.read_kind(path)
    for name, family in FAMILIES.items():
        if family.transformer_kind == kind:
            return name
    raise checkpoint.CheckpointError(f"{path}: a {kind!r} is not the transformer of any model family")
