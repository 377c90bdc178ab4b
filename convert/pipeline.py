"""A whole diffusers pipeline folder (model_index.json) -> a vapjax pipeline folder.

    <dst>/transformer/ <dst>/vae/ <dst>/text_encoder/ (+ Wan: <dst>/image_encoder/)   vapjax checkpoints
    <dst>/tokenizer/                 the tokenizer files, copied
    <dst>/image_processor/           (Wan) preprocessor_config.json, copied after validation
    <dst>/scheduler/scheduler_config.json   copied after validation
    <dst>/pipeline.json              {"vapjax_pipeline": <class>, "components": [...]}

What each pipeline class consists of is one `PipelineSpec` in `PIPELINES`: its model converters, the
files copied verbatim, and the checks run on the small files before any weights are read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Mapping

from convert.clip import convert_clip
from convert.cogvideox import convert_transformer as convert_cogvideox
from convert.cogvideox_vae import convert_vae as convert_cogvideox_vae
from convert.errors import ConversionError
from convert.source import read_json
from convert.t5 import convert_t5
from convert.wan import convert_transformer as convert_wan
from convert.wan_vae import convert_vae as convert_wan_vae
from vapjax.clip_preprocess import CLIPPreprocessConfig
from vapjax.flow_sampling import schedule_from_config
from vapjax.sampling import DDIMSchedule

TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _check_tokenizer(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, "spiece.model")):
        raise ConversionError(f"{folder}: no spiece.model")


def _check_image_processor(folder: str) -> None:
    try:
        CLIPPreprocessConfig.from_file(os.path.join(folder, "preprocessor_config.json"))
    except ValueError as e:
        raise ConversionError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    transformer: Callable[..., Any]             # convert(src, dst, *, init_expert, expert_layers, dtype, check_only)
    models: Mapping[str, Callable[..., Any]]    # other component folder -> convert(src, dst, dtype=, check_only=)
    copied: Mapping[str, tuple[tuple[str, ...], Callable[[str], None]]]  # folder -> (files, check(folder))
    schedule: Callable[[dict], Any]             # validates scheduler_config.json (raises ValueError)

    @property
    def components(self) -> tuple[str, ...]:
        return ("transformer", *self.models, *self.copied, "scheduler")


COGVIDEOX = PipelineSpec(
    transformer=convert_cogvideox, models={"vae": convert_cogvideox_vae, "text_encoder": convert_t5},
    copied={"tokenizer": (TOKENIZER_FILES, _check_tokenizer)}, schedule=DDIMSchedule.from_config)
WAN = PipelineSpec(
    transformer=convert_wan,
    models={"vae": convert_wan_vae, "text_encoder": convert_t5, "image_encoder": convert_clip},
    copied={"tokenizer": (TOKENIZER_FILES, _check_tokenizer),
            "image_processor": (("preprocessor_config.json",), _check_image_processor)},
    schedule=schedule_from_config)

PIPELINES: dict[str, PipelineSpec] = {
    "CogVideoXImageToVideoMOTPipeline": COGVIDEOX, "CogVideoXImageToVideoPipeline": COGVIDEOX,
    "WanImageToVideoMOTPipeline": WAN, "WanImageToVideoPipeline": WAN,
}


def _absent(entry: Any) -> bool:
    """A model_index.json entry for an optional component that is not there (e.g. `[null, null]`)."""
    return entry is None or (isinstance(entry, list) and all(e is None for e in entry))


def convert_pipeline(src: str, dst: str, *, init_expert=None, expert_layers=None, dtype=None) -> None:
    index = read_json(os.path.join(src, "model_index.json"))
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ConversionError(f"{src}/model_index.json: pipeline {name!r} is not supported (only {', '.join(PIPELINES)})")
    spec = PIPELINES[name]
    missing = [c for c in spec.components if not os.path.isdir(os.path.join(src, c))]
    if missing:
        raise ConversionError(f"{src}: pipeline folder lacks {', '.join(missing)}")
    # Components are the entries naming a (library, class); scalar pipeline settings are other keys.
    unknown = sorted(k for k, v in index.items() if not k.startswith("_") and k not in spec.components
                     and isinstance(v, list) and not _absent(v))
    if unknown:
        raise ConversionError(f"{src}/model_index.json: unexpected components {', '.join(unknown)}")

    # Validate the cheap parts first, so a bad folder fails before gigabytes are read.
    scheduler = read_json(os.path.join(src, "scheduler", "scheduler_config.json"))
    try:
        spec.schedule(scheduler)
    except ValueError as e:
        raise ConversionError(f"{src}/scheduler: {e}") from None
    for folder, (_, check) in spec.copied.items():
        check(os.path.join(src, folder))
    # Then every model's config and tensor index (names, shapes, byte ranges), before anything is written.
    spec.transformer(os.path.join(src, "transformer"), init_expert=init_expert, expert_layers=expert_layers,
                     dtype=dtype, check_only=True)
    for folder, convert in spec.models.items():
        convert(os.path.join(src, folder), None, dtype=dtype, check_only=True)

    os.makedirs(dst, exist_ok=True)
    spec.transformer(os.path.join(src, "transformer"), os.path.join(dst, "transformer"),
                     init_expert=init_expert, expert_layers=expert_layers, dtype=dtype)
    for folder, convert in spec.models.items():
        convert(os.path.join(src, folder), os.path.join(dst, folder), dtype=dtype)
    for folder, (files, _) in spec.copied.items():
        os.makedirs(os.path.join(dst, folder), exist_ok=True)
        for file in files:
            if os.path.exists(os.path.join(src, folder, file)):
                shutil.copy(os.path.join(src, folder, file), os.path.join(dst, folder, file))
    os.makedirs(os.path.join(dst, "scheduler"), exist_ok=True)
    with open(os.path.join(dst, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=1)
    with open(os.path.join(dst, "pipeline.json"), "w") as f:
        json.dump({"vapjax_pipeline": name, "components": list(spec.components)}, f, indent=1)
