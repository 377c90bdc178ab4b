"""Model families (CogVideoX, Wan) as entries of one table, never as `if family == ...`.

A family names what differs between them for the entry points:

  transformer_kind  the `vapjax.checkpoint.KINDS` key of its diffusion transformer (VAP model)
  pipeline          the generation pipeline class: `Pipeline.load(folder, dtype=, attention=, tiling=)`
                    (or `Pipeline.random_from_config(model_section, ...)`) returns a callable
                    `pipe(image, ref_videos, request)`; `Pipeline.validate(image, ref_videos, request)`
                    checks a request before any weights are used
  request           the pipeline's Request dataclass (sample.py fills its fields from a config)
  objective         `objective(train_config, model_config) -> objective(params, batch, rng, empty_text)
                    -> loss`, the training objective `vapjax.training.make_train_step` takes

A family is one entry here, next to its converter (`convert/__main__.py` MODELS, `convert/pipeline.py`
PIPELINES) and its checkpoint kind (`vapjax.checkpoint.KINDS`).
`sample.py` and `train.py` look the family up by name (`get(c.family)`) or from a converted folder
(`of_checkpoint(path)`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax.numpy as jnp

from vapjax import checkpoint, sampling, training
from vapjax.models import cogvideox
from vapjax.pipelines import cogvideox_vap, wan_vap


@dataclasses.dataclass(frozen=True)
class Family:
    transformer_kind: str
    pipeline: type
    request: type                      # the pipeline's Request dataclass
    objective: Callable[[Any, Any], Callable]


def _cogvideox_objective(c, cfg: cogvideox.CogVideoXConfig) -> Callable:
    """v-prediction DDIM (spec §7.3) with the schedule, scaling factor and caption dropout of config `c`."""
    schedule = sampling.DDIMSchedule.from_config(c.scheduler.to_dict())
    return training.cogvideox_objective(cogvideox.CogVideoXTransformer(cfg), schedule.alphas_cumprod,
                                        scaling_factor=c.scaling_factor, caption_dropout=c.caption_dropout,
                                        dtype=jnp.dtype(cfg.dtype))


def _wan_objective(c, cfg) -> Callable:
    raise ValueError("Wan-VAP training is not implemented yet (vapjax.training has no Wan objective)")


FAMILIES: dict[str, Family] = {
    "cogvideox": Family("cogvideox_transformer", cogvideox_vap.CogVideoXVAP, cogvideox_vap.Request,
                        _cogvideox_objective),
    "wan": Family("wan_transformer", wan_vap.WanVAP, wan_vap.Request, _wan_objective),
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
