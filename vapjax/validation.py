"""Validation during training: sample a few fixed cases with the current weights, write mp4s and TensorBoard videos.

Cases come from a validation file in the official layout (examples/training/sft/*/vap_mot/validation.json):
{"root": <VAP-Data folder; a relative one is relative to the working directory, as in the official
trainer>, "val_data": [<csv>, ...], "sample_ref_videos_num": n, "num_frames", "height", "width",
"num_inference_steps", "frames_selection"}. As the official validation set (DS:1243-1340) a case is
a CSV row with alignment score > `score_threshold` (70): the target's first frame (at 16 fps) is the
image, its caption the prompt, and each of `sample_ref_videos_num` references comes with its own row's
caption. Unlike the official random draw, the cases are the first `max_samples` usable rows in CSV order
and their first listed references, so every validation of a run sees the same inputs.

Cost is bounded by `max_samples` × `steps` (the config may lower the file's num_inference_steps) and
happens every `every` training steps; the pipeline is built once and only its transformer weights are
swapped in.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from vapjax import video


@dataclasses.dataclass
class Case:
    name: str
    image: np.ndarray                 # uint8 [H, W, 3]
    refs: list[np.ndarray]            # uint8 [F, H, W, 3] each
    prompt: str
    ref_prompts: tuple[str, ...]


def read_cases(path: str, max_samples: int, score_threshold: float = 70.0) -> tuple[list[Case], dict]:
    """(cases, generation settings of the file: height, width, num_frames, steps, frames_selection)."""
    try:
        with open(path) as f:
            spec = json.load(f)
        root, csvs = spec["root"], spec["val_data"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a validation file with root and val_data ({type(e).__name__}: {e})") from None
    rows = []
    for name in csvs:
        with open(os.path.join(root, name), newline="", encoding="utf-8") as f:
            rows += list(csv.DictReader(f))
    captions = {r["video_paths"]: r["tar_video_caption"] or "" for r in rows}
    n_refs = int(spec.get("sample_ref_videos_num", 1))
    cases = []
    for r in rows:
        if len(cases) >= max_samples:
            break
        try:
            score = float(r.get("reference_alignment_score", "nan"))
            refs = [p for p in json.loads(r["ref_video_paths"] or "[]") if p in captions][:n_refs]
        except ValueError:
            continue
        target = os.path.join(root, r["video_paths"])
        if not score > score_threshold or len(refs) < n_refs or not os.path.isfile(target):
            continue
        clip, fps = video.read_video(target)
        first = clip[video.resample_fps(len(clip), int(fps))][0]
        ref_clips = []
        for p in refs:
            c, f = video.read_video(os.path.join(root, p))
            ref_clips.append(c[video.resample_fps(len(c), int(f))])
        name = os.path.splitext(os.path.basename(r["video_paths"]))[0]
        cases.append(Case(name, first, ref_clips, captions[r["video_paths"]], tuple(captions[p] for p in refs)))
    if not cases:
        raise ValueError(f"{path}: no validation case (rows with score > {score_threshold:g} and "
                         f"{n_refs} known reference(s) whose video exists)")
    settings = dict(height=spec.get("height", 480), width=spec.get("width", 720), num_frames=spec.get("num_frames", 49),
                    steps=spec.get("num_inference_steps", 50), frames_selection=spec.get("frames_selection", "evenly"))
    return cases, settings


def beside(reference: np.ndarray, output: np.ndarray) -> np.ndarray:
    """uint8 [T, H, 2W, 3]: the reference (frames chosen evenly, resized) left of the output."""
    t, h, w = output.shape[:3]
    ref = video.resize(reference[video.select_frames(len(reference), t, "evenly")], h, w, "bicubic")
    return np.concatenate([ref, output], axis=2)


class Validator:
    """validate(step, transformer_params): every case through `pipe` (a family pipeline) with the given
    weights; <out_dir>/step_<N>/<case>.mp4 and, with a TensorBoard `writer`, a video summary per case
    with the first reference beside the output. With several processes every one calls it (the sharded
    denoising loop needs them all) and only the one with `write` writes."""

    def __init__(self, pipe, request: Callable[..., Any], cases: Sequence[Case], settings: dict, out_dir: str,
                 writer=None, fps: int = 16, write: bool = True):
        self.pipe, self.request, self.cases, self.settings = pipe, request, list(cases), dict(settings)
        self.out_dir, self.writer, self.fps, self.write = out_dir, writer, fps, write

    def __call__(self, step: int, params) -> list[str]:
        self.pipe.transformer.params = params
        folder = os.path.join(self.out_dir, f"step_{step}")
        if self.write:
            os.makedirs(folder, exist_ok=True)
        written = []
        for case in self.cases:
            req = self.request(prompt=case.prompt, ref_prompts=case.ref_prompts, **self.settings)
            self.pipe.validate(case.image, case.refs, req)
            frames = (np.clip(self.pipe(case.image, case.refs, req).frames, 0, 1) * 255).astype(np.uint8)  # as write_video
            if not self.write:
                continue
            path = os.path.join(folder, f"{case.name}.mp4")
            video.write_video(path, frames, fps=self.fps)
            written.append(path)
            if self.writer is not None:  # tensorboardX: [N, T, C, H, W] uint8
                clip = beside(case.refs[0], frames).transpose(0, 3, 1, 2)[None]
                self.writer.add_video(f"validation/{case.name}", clip, step, fps=self.fps)
        return written
