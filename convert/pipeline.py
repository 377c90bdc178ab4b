"""A whole diffusers pipeline folder (model_index.json) -> a vapjax pipeline folder.

    <dst>/transformer/  <dst>/vae/  <dst>/text_encoder/   vapjax checkpoints (see vapjax.checkpoint)
    <dst>/tokenizer/                                    the tokenizer files, copied
    <dst>/scheduler/scheduler_config.json              copied after validation
    <dst>/pipeline.json                                 {"vapjax_pipeline": <class>, "components": [...]}
"""
from __future__ import annotations

import json
import os
import shutil

from convert.cogvideox import convert_transformer
from convert.cogvideox_vae import convert_vae
from convert.errors import ConversionError
from convert.source import read_json
from convert.t5 import convert_t5
from vapjax.sampling import DDIMSchedule

PIPELINES = ("CogVideoXImageToVideoMOTPipeline", "CogVideoXImageToVideoPipeline")
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def convert_pipeline(src: str, dst: str, *, init_expert=None, expert_layers=None, dtype=None) -> None:
    index = read_json(os.path.join(src, "model_index.json"))
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ConversionError(f"{src}/model_index.json: pipeline {name!r} is not supported (only {', '.join(PIPELINES)})")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(src, c))]
    if missing:
        raise ConversionError(f"{src}: pipeline folder lacks {', '.join(missing)}")
    unknown = sorted(k for k in index if not k.startswith("_") and k not in COMPONENTS)
    if unknown:
        raise ConversionError(f"{src}/model_index.json: unexpected components {', '.join(unknown)}")

    # Validate the cheap parts first, so a bad folder fails before gigabytes are read.
    scheduler = read_json(os.path.join(src, "scheduler", "scheduler_config.json"))
    try:
        DDIMSchedule.from_config(scheduler)
    except ValueError as e:
        raise ConversionError(f"{src}/scheduler: {e}") from None
    if not os.path.isfile(os.path.join(src, "tokenizer", "spiece.model")):
        raise ConversionError(f"{src}/tokenizer: no spiece.model")

    os.makedirs(dst, exist_ok=True)
    convert_transformer(os.path.join(src, "transformer"), os.path.join(dst, "transformer"),
                        init_expert=init_expert, expert_layers=expert_layers, dtype=dtype)
    convert_vae(os.path.join(src, "vae"), os.path.join(dst, "vae"), dtype=dtype)
    convert_t5(os.path.join(src, "text_encoder"), os.path.join(dst, "text_encoder"), dtype=dtype)
    os.makedirs(os.path.join(dst, "tokenizer"), exist_ok=True)
    for file in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, "tokenizer", file)):
            shutil.copy(os.path.join(src, "tokenizer", file), os.path.join(dst, "tokenizer", file))
    os.makedirs(os.path.join(dst, "scheduler"), exist_ok=True)
    with open(os.path.join(dst, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=1)
    with open(os.path.join(dst, "pipeline.json"), "w") as f:
        json.dump({"vapjax_pipeline": name, "components": list(COMPONENTS)}, f, indent=1)
