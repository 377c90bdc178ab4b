"""What every family's generation pipeline shares: its components, its output and the recorder hook."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from vapjax import checkpoint, memory

# recorder(name, value): receives the run's intermediates (channels-last arrays), e.g. `dict.__setitem__`.
Recorder = Callable[[str, Any], None]


@dataclasses.dataclass
class Output:
    frames: np.ndarray                 # float32 [F, H, W, 3] in [0, 1]
    latents: np.ndarray                # final latents [1, f, h, w, C]


@dataclasses.dataclass
class Component:
    config: Any
    params: Any


def require_pipeline_folder(path: str) -> None:
    """A one-line CheckpointError unless `path` is a converted vapjax pipeline folder."""
    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"{path}: no such checkpoint folder")
    if not os.path.exists(os.path.join(path, "pipeline.json")):
        hint = ("it is a diffusers folder: convert it first with python -m convert "
                f"{path} OUT_DIR" if os.path.exists(os.path.join(path, "model_index.json"))
                else "convert a diffusers pipeline folder with python -m convert SRC OUT_DIR")
        raise checkpoint.CheckpointError(f"{path}: not a converted vapjax pipeline ({hint})")


def check_offload(mode: str) -> None:
    if mode not in memory.OFFLOAD_MODES:
        raise ValueError(f"offload={mode!r}: one of {', '.join(memory.OFFLOAD_MODES)}")
