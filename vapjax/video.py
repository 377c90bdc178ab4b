"""Host-side image / video I/O and the reference's frame selection, resampling and pixel scaling.

Frames are numpy uint8 [F, H, W, 3] RGB. Every file problem raises `VideoError`, a one-line message
that starts with the file's path.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Sequence

import numpy as np

from vapjax.numerics import torch_linspace

RESIZE_METHODS = ("lanczos", "bicubic")
FRAME_SELECTIONS = ("evenly", "first", "random")

logger = logging.getLogger(__name__)


class VideoError(ValueError):
    """An image or video file that is missing, unreadable or unusable (one line, naming the file)."""


def _error(path, problem: str) -> VideoError:
    return VideoError(f"{os.fspath(path)}: {problem}")


def _reason(exc: BaseException) -> str:
    """The first line of a decoder's message (ffmpeg appends its whole log)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _require_file(path) -> None:
    if not os.path.isfile(path):
        raise _error(path, "no such file")


def read_image(path) -> np.ndarray:
    """An image file as uint8 [H, W, 3] RGB (alpha dropped, grayscale/palette expanded)."""
    from PIL import Image

    _require_file(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise _error(path, f"cannot read image ({_reason(exc)})") from exc


def read_video(path) -> tuple[np.ndarray, float]:
    """All frames of a video as uint8 [F, H, W, 3] RGB, and its average frame rate (ffmpeg via imageio)."""
    import imageio.v3 as iio

    _require_file(path)
    try:
        with iio.imopen(path, "r", plugin="FFMPEG") as video:
            fps = float(video.metadata()["fps"])
            frames = video.read(index=None)
    except (OSError, RuntimeError, ValueError, IndexError, KeyError) as exc:
        raise _error(path, f"cannot read video ({_reason(exc)})") from exc
    if frames.ndim != 4 or len(frames) == 0:
        raise _error(path, "the video has no frames")
    return frames, fps


def require_frames(path, frames, n: int) -> None:
    """Fail unless `frames` (read from `path`) has at least n frames."""
    if len(frames) < n:
        raise _error(path, f"needs at least {n} frames, the file has {len(frames)}")


# Containers that take H.264 (what `write_video` writes); ffmpeg refuses others only once the frames exist.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".m4v")


def check_output(path) -> None:
    """A one-line VideoError, before any long work, if `write_video(path, ...)` could not write there: a
    folder, an unknown container suffix, or a place that is not writable (the nearest existing parent
    folder must be writable; `write_video` creates the missing ones)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise _error(path, "is a folder, not a video file name")
    if os.path.splitext(path)[1].lower() not in VIDEO_SUFFIXES:
        raise _error(path, f"cannot write a video of this type (use one of {', '.join(VIDEO_SUFFIXES)})")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise _error(path, "is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise _error(path, f"{parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _error(path, f"cannot create files in {parent}")


def write_video(path, frames, fps: float = 16, quality: float = 5.0) -> None:
    """Write frames (uint8, or float in [0, 1]) [F, H, W, 3] as an H.264 mp4 (yuv420p).

    Float frames become uint8 as diffusers' export_to_video does for the reference (×255, truncated).
    yuv420p needs even sizes: an odd height/width gets one replicated edge row/column
    (never rescaled; imageio's macro-block resize is disabled). quality is imageio's 0–10 scale.
    """
    import imageio.v3 as iio

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_video: expected frames [F, H, W, 3] with F >= 1, got shape {frames.shape}")
    if np.issubdtype(frames.dtype, np.floating):
        frames = (np.clip(frames, 0, 1) * 255).astype(np.uint8)
    elif frames.dtype != np.uint8:
        raise ValueError(f"write_video: expected uint8 or float frames, got {frames.dtype}")
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        iio.imwrite(path, frames, plugin="FFMPEG", fps=fps, codec="libx264", quality=quality,
                    pixelformat="yuv420p", macro_block_size=1)
    except (OSError, RuntimeError, ValueError) as exc:
        raise _error(path, f"cannot write video ({_reason(exc)})") from exc


def select_frames(n_total: int, n: int, mode: str = "evenly", rng: random.Random | None = None) -> np.ndarray:
    """Indices of the n frames the reference picks from a clip of n_total (int64).

    "evenly": floor(linspace(0, n_total − 1, n)) in float32, as the pipeline, the infer scripts and
    training do (float32 rounding makes a few indices differ from exact floor; repeats when n > n_total).
    "first": the first min(n, n_total) frames.
    "random": n consecutive frames from start = rng.randint(0, n_total − n) (needs n_total >= n).
    """
    if n_total < 1 or n < 1:
        raise ValueError(f"select_frames: need n_total >= 1 and n >= 1, got {n_total} and {n}")
    if mode == "evenly":
        return torch_linspace(0, n_total - 1, n).astype(np.int64)  # .long() truncates; values are >= 0
    if mode == "first":
        return np.arange(min(n, n_total))
    if mode == "random":
        if n_total < n:
            raise ValueError(f"select_frames: 'random' needs at least {n} frames, got {n_total}")
        start = (rng or random.Random(0)).randint(0, n_total - n)
        return np.arange(start, start + n)
    raise ValueError(f"select_frames: unknown mode {mode!r} (use one of {', '.join(FRAME_SELECTIONS)})")


def select_reference_frames(lengths: Sequence[int], n: int, mode: str = "evenly", *, seed: int = 0,
                            per_reference_length: bool = False) -> list[np.ndarray]:
    """Frame indices for each of the reference videos (of `lengths` frames), as the official pipeline
    picks them (spec §4.1, CPIPE:894-906).

    "evenly": floor(linspace(0, L0 − 1, n)) over the FIRST reference's length L0, for every reference
    (official; each reference then needs L0 frames). per_reference_length=True instead spaces each
    reference over its own length (not the official behaviour). A reference shorter than n frames gets
    repeated frames; a one-line note is logged.
    "first": the first n frames of each (each needs n).
    "random": each reference's n consecutive frames from start = randint(0, L − n), drawn in order from
    random.Random(seed) (the official draws from Python's global `random`; each needs n).
    Errors are one-line ValueErrors naming the reference.
    """
    check_reference_lengths(lengths, n, mode, per_reference_length)
    if mode != "evenly":
        rng = random.Random(seed)
        return [select_frames(length, n, mode, rng) for length in lengths]
    spans = list(lengths) if per_reference_length else [lengths[0]] * len(lengths)
    for i in range(len(spans) if per_reference_length else 1):  # without it, all share the first's span
        if spans[i] < n:
            logger.warning("reference video %d has %d frames, fewer than %d: 'evenly' repeats frames", i, spans[i], n)
    return [select_frames(span, n, "evenly") for span in spans]


def check_reference_lengths(lengths: Sequence[int], n: int, mode: str = "evenly",
                            per_reference_length: bool = False) -> None:
    """The one-line ValueError `select_reference_frames` would raise for these reference lengths, if any."""
    if mode not in FRAME_SELECTIONS:
        raise ValueError(f"frames_selection={mode!r}: use one of {', '.join(FRAME_SELECTIONS)}")
    for i, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"reference video {i} has no frames")
        if mode != "evenly" and length < n:
            raise ValueError(f"reference video {i} has {length} frames; frames_selection={mode!r} needs {n} "
                             "('evenly' repeats frames of a short reference)")
        if mode == "evenly" and not per_reference_length and length <= select_frames(lengths[0], n)[-1]:
            raise ValueError(f"reference video {i} has {length} frames, but 'evenly' picks frames over the first "
                             f"reference's {lengths[0]}, as the official pipeline (frames_per_reference_length=True "
                             "spaces each reference over its own length)")


def resample_fps(n: int, fps: float, target: float = 16) -> np.ndarray:
    """Indices that resample n frames at `fps` to `target` fps, as the training data pipeline does.

    round(linspace(0, n − 1, int(n·(target/fps)))) with repeats removed (numpy rounds halves to even);
    identity when fps == target; the middle frame when fewer than one frame would remain. The dataset
    passes int(average fps) as `fps`.
    """
    if fps == target:
        return np.arange(n)
    count = int(n * (target / fps))
    if count < 1:
        return np.array([n // 2])
    return np.unique(np.round(np.linspace(0, n - 1, count)).astype(np.int64))


def resize(frames: np.ndarray, height: int, width: int, method: str = "lanczos") -> np.ndarray:
    """Resize uint8 frames [..., H, W, 3] with PIL per frame (the pipeline's lanczos, or bicubic).

    Frames already at the size are copied unchanged, as PIL does (the pipeline relies on this).
    """
    from PIL import Image

    if method not in RESIZE_METHODS:
        raise ValueError(f"resize: unknown method {method!r} (use one of {RESIZE_METHODS})")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"resize: expected uint8 frames [..., H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[-3:-1] == (height, width):
        return frames.copy()
    resample = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}[method]
    flat = frames.reshape((-1,) + frames.shape[-3:])
    out = np.stack([np.asarray(Image.fromarray(f).resize((width, height), resample)) for f in flat])
    return out.reshape(frames.shape[:-3] + out.shape[1:])


def to_model_range(frames: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [-1, 1] as the pipeline's VideoProcessor: x / 255 · 2 − 1 in float32."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"to_model_range: expected uint8 pixels, got {frames.dtype}")
    return frames.astype(np.float32) / np.float32(255) * np.float32(2) - np.float32(1)
