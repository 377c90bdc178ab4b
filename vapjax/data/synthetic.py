"""A miniature VAP-Data folder for tests and demos: small mp4s and a `vap_data.csv` in the official format.

It holds one example of every case the `vap_data` builder handles. With the "tiny" config (9 frames at
16 fps, score > 0) the outcome of each row is given in `CLIPS` (`expect`): "ok", a skip reason of
`vap_data`, or the filter that removes it.

    python -m vapjax.data.synthetic OUT_DIR
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import zlib

import numpy as np

from vapjax import video

HEADER = ("video_paths", "ref_video_paths", "tar_video_caption", "kind", "split", "reference_alignment_score",
          "_valid")


@dataclasses.dataclass(frozen=True)
class Clip:
    name: str
    kind: str
    expect: str
    fps: int = 16
    frames: int = 12
    size: tuple[int, int] = (48, 64)
    refs: tuple[str, ...] = ()
    refs_json: str | None = None   # the raw cell, to write an unparsable one
    split: str = "train"
    score: float = 50.0
    valid: int = 1
    file: str = "video"            # "video", "missing" (not written) or "garbage" (not an mp4)

    @property
    def path(self) -> str:
        return f"videos/{self.name}.mp4"


CLIPS = (
    # Kept. a0 lists rows that are filtered out; a2 lists itself; b1's empty list falls back to b0, the only
    # other usable "melt"; c0 lists only broken files and falls back to c1.
    Clip("a0", "balloon", "ok", fps=8, frames=12, refs=("a1", "a2", "t0", "z0")),
    Clip("a1", "balloon", "ok", fps=24, frames=20, size=(72, 96), refs=("a0", "a2")),
    Clip("m0", "balloon", "missing video file", file="missing", refs=("a0",)),
    Clip("a2", "balloon", "ok", frames=9, size=(80, 120), refs=("a2", "a0")),
    Clip("t0", "balloon", "split", split="test", refs=("a0",)),
    Clip("b0", "melt", "ok", frames=10, refs=("b1", "b2")),
    Clip("z0", "balloon", "score", score=0, refs=("a0",)),
    Clip("b1", "melt", "ok", fps=24, frames=30, size=(72, 96)),
    Clip("b2", "melt", "too few frames", fps=8, frames=6, refs=("b0",)),    # 8 fps keeps 6 frames < 9
    Clip("g0", "spin", "unreadable video", file="garbage", refs=("c0",)),
    Clip("c0", "spin", "ok", refs=("m0", "g0")),
    Clip("c1", "spin", "ok", fps=24, frames=15, refs=("c0",)),             # 24 -> 16 fps: 10 frames
    Clip("e0", "spin", "too few frames", fps=24, frames=12, refs=("c0",)),  # 24 -> 16 fps: 8 frames
    Clip("v0", "melt", "_valid", valid=0, refs=("b0",)),
    Clip("j0", "melt", "invalid row", refs_json="[videos/b0.mp4"),
    Clip("s0", "solo", "no reference"),                                      # alone in its kind
    Clip("a0", "balloon", "duplicate path", refs=("a1",)),
)


def _frames(clip: Clip) -> np.ndarray:
    """A moving colour pattern, distinct per clip and per frame."""
    rng = np.random.default_rng(zlib.crc32(clip.name.encode()))
    h, w = clip.size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base, speed = rng.uniform(0, 255, 3), rng.uniform(10, 30, 3)
    out = [(base + 200 * np.stack([x, y, x * y], -1) + t * speed) % 255 for t in range(clip.frames)]
    return np.asarray(out).astype(np.uint8)


def _row(clip: Clip) -> dict:
    refs = clip.refs_json if clip.refs_json is not None else json.dumps([f"videos/{r}.mp4" for r in clip.refs])
    return dict(zip(HEADER, (clip.path, refs, f"A {clip.kind} effect: clip {clip.name}.", clip.kind, clip.split,
                             clip.score, clip.valid)))


def write(root: str, clips=CLIPS) -> str:
    """Write the folder (videos/ and vap_data.csv) under root; returns root."""
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    first = {}
    for c in clips:  # a duplicate row names the file of the first
        first.setdefault(c.name, c)
    for clip in first.values():
        target = os.path.join(root, clip.path)
        if clip.file == "video":
            video.write_video(target, _frames(clip), fps=clip.fps)
        elif clip.file == "garbage":
            with open(target, "wb") as f:
                f.write(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    with open(os.path.join(root, "vap_data.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, HEADER)
        writer.writeheader()
        writer.writerows(_row(c) for c in clips)
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vapjax.data.synthetic OUT_DIR")
    print(write(sys.argv[1]))
