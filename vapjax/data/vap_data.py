"""VAP-Data as a TensorFlow-Datasets dataset, `vap_data`: decoded training clips in array_record files.

The source is a local VAP-Data folder, given as TFDS's `manual_dir`: `vap_data.csv` and the videos it
names (paths relative to the folder). CSV columns: `video_paths`, `ref_video_paths` (a JSON list of
paths), `tar_video_caption`, `kind`, `split`, `reference_alignment_score`, optionally `_valid`.

Rows are selected as the official loader does (spec §7.6): `split == "train"`, `_valid > 0` when the
column exists, `reference_alignment_score > score_threshold`. A config with `all_splits` keeps the rows
of every split, as the official DPO loader does for its candidate pools (it filters the whole CSV before
taking the train rows, DS:904-919); the SFT loader refuses such a dataset. Each row's reference list
keeps the surviving paths other than itself; an empty list falls back to one random surviving video of
the same `kind`; rows left without a reference are dropped. Clips are decoded whole, resampled to `fps` (the
official round(linspace) rule on int(average fps)), `frames` of them picked evenly (floor(linspace)) and
resized bicubic to height x width without keeping the aspect. Two deliberate differences: the resize is
PIL's on uint8 pixels (`vapjax.video.resize`), where the official one is torch's on float pixels
(no antialiasing, no clamp); and a clip with fewer than `frames` frames is skipped, where the official
loader would train on its first frame alone.

Unlike the official loader, bad rows do not stop the build: a missing, unreadable or too short video, an
unparsable reference list, a duplicate path, or a row left without references is logged (CSV line,
path, reason), counted in a summary, recorded in the dataset's `metadata.json` ("report"), and
skipped. Videos are checked before the references are resolved, so no reference points to a skipped
row. The price is that every video is decoded twice (check, then write), on `workers` threads.

Each example (in CSV order; its index is its position):
    video      uint8 [frames, height, width, 3], stored uncompressed (50.8 MB at 49x480x720)
    caption    the row's `tar_video_caption`
    kind, path, split
    ref_index  int64 [n]: indices of its references in this dataset, in the CSV's order

    python -m vapjax.data.vap_data --manual_dir VAP-Data --data_dir DATA [--config tiny] [--score_threshold 10]
        [--all_splits]
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import dataclasses
import json
import logging
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from vapjax import video

log = logging.getLogger(__name__)

CSV_NAME = "vap_data.csv"
COLUMNS = ("video_paths", "ref_video_paths", "tar_video_caption", "kind", "split", "reference_alignment_score")

# Reasons a row is skipped (each logged) ...
MISSING = "missing video file"
UNREADABLE = "unreadable video"
TOO_SHORT = "too few frames"
NO_REFERENCE = "no reference"
INVALID = "invalid row"
DUPLICATE = "duplicate path"
# ... and filters that leave rows out by design (only counted).
FILTERS = ("split", "_valid", "score")


@dataclasses.dataclass(kw_only=True)
class VapDataConfig(tfds.core.BuilderConfig):
    """The clip bucket and the row filter. `seed` drives the same-kind fallback reference draws."""
    frames: int = 49
    height: int = 480
    width: int = 720
    fps: int = 16
    score_threshold: float = 0.0
    all_splits: bool = False       # keep every split (DPO candidate pools), not only "train"
    seed: int = 42


def make_config(frames: int = 49, height: int = 480, width: int = 720, fps: int = 16,
                score_threshold: float = 0.0, name: str | None = None, all_splits: bool = False) -> VapDataConfig:
    splits = "_all" if all_splits else ""
    name = name or f"{frames}x{height}x{width}_fps{fps}_score{score_threshold:g}{splits}"
    return VapDataConfig(name=name, frames=frames, height=height, width=width, fps=fps,
                         score_threshold=score_threshold, all_splits=all_splits,
                         description=f"{frames} frames {height}x{width} at {fps} fps, score > {score_threshold:g}, "
                                     f"{'every split' if all_splits else 'train split'}")


@dataclasses.dataclass(frozen=True)
class Row:
    line: int                    # CSV line number (header = 1), for reports
    path: str
    refs: tuple[str, ...]
    caption: str
    kind: str
    split: str = "train"


@dataclasses.dataclass
class Report:
    """Rows left out: skipped ones (bad data, each logged) and filtered ones (by design, counted)."""
    rows: int = 0
    skipped: list[dict] = dataclasses.field(default_factory=list)
    filtered: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def skip(self, line: int, path: str, reason: str, detail: str) -> None:
        self.skipped.append({"line": line, "path": path, "reason": reason, "detail": detail})
        log.warning("vap_data: skipping CSV line %d (%s): %s: %s", line, path, reason, detail)

    def summary(self, kept: int) -> str:
        skipped = collections.Counter(s["reason"] for s in self.skipped)
        parts = lambda counts: ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
        return (f"vap_data: {self.rows} CSV rows -> {kept} examples; filtered: {parts(self.filtered)}; "
                f"skipped: {parts(skipped)}")

    def to_json(self) -> dict:
        return {"rows": self.rows, "filtered": dict(self.filtered), "skipped": self.skipped}


class ShortClip(video.VideoError):
    """A video with fewer frames than the bucket after fps resampling."""


# ---------------------------------------------------------------------------------------------------
# Clips


def decode(path: str, fps: int, frames: int) -> np.ndarray:
    """All frames of `path` resampled to `fps`; `ShortClip` when fewer than `frames` remain.

    The official loader takes int(average fps) and keeps index order of the deduplicated round(linspace)
    indices, so upsampling never repeats frames: an 8 fps clip keeps its own frame count.
    """
    clip, source_fps = video.read_video(path)
    if not 1 <= source_fps < 10_000:  # resampling divides by int(fps)
        raise video.VideoError(f"{path}: unusable frame rate {source_fps}")
    kept = clip[video.resample_fps(len(clip), int(source_fps), fps)]
    if len(kept) < frames:
        raise ShortClip(f"{path}: {len(kept)} frames at {fps} fps ({len(clip)} at {source_fps:g} fps); "
                        f"the bucket needs {frames}")
    return kept


def to_bucket(clip: np.ndarray, cfg: VapDataConfig) -> np.ndarray:
    clip = clip[video.select_frames(len(clip), cfg.frames, "evenly")]
    return video.resize(clip, cfg.height, cfg.width, "bicubic")


def load_clip(path: str, cfg: VapDataConfig) -> np.ndarray:
    """uint8 [frames, height, width, 3]: the clip as the official training loader shapes it."""
    return to_bucket(decode(path, cfg.fps, cfg.frames), cfg)


def _video_problem(root: str, row: Row, cfg: VapDataConfig) -> tuple[str, str] | None:
    """(reason, detail) when the row's video cannot make an example, else None."""
    path = os.path.join(root, row.path)
    if not os.path.isfile(path):
        return MISSING, f"{path}: no such file"
    try:
        decode(path, cfg.fps, cfg.frames)
    except ShortClip as e:
        return TOO_SHORT, str(e)
    except video.VideoError as e:
        return UNREADABLE, str(e)
    return None


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items on threads (ffmpeg decodes in subprocesses), in order, at most 2·workers in flight."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------------
# Rows


def read_csv(path: str) -> list[tuple[int, dict]]:
    """(line number, record) of every data row; a missing column is fatal (the file is not VAP-Data)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        return [(reader.line_num, record) for record in reader]


def _number(text: str) -> float:
    """A CSV cell as pandas would compare it: numbers, booleans; anything else is NaN (never > t)."""
    text = (text or "").strip()
    if text.lower() in ("true", "false"):
        return float(text.lower() == "true")
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _ref_list(text: str) -> tuple[str, ...]:
    refs = json.loads(text) if text.strip() else []
    if not isinstance(refs, list) or not all(isinstance(p, str) for p in refs):
        raise ValueError("not a JSON list of paths")
    return tuple(refs)


def select_rows(records: Sequence[tuple[int, dict]], threshold: float, report: Report,
                all_splits: bool = False) -> list[Row]:
    """The official row filter; rows whose cells cannot be read are skipped and reported."""
    rows, first_line = [], {}
    report.rows += len(records)
    for line, rec in records:
        if rec["split"] != "train" and not all_splits:
            report.filtered["split"] += 1
        elif "_valid" in rec and not _number(rec["_valid"]) > 0:
            report.filtered["_valid"] += 1
        elif not _number(rec["reference_alignment_score"]) > threshold:
            report.filtered["score"] += 1
        elif rec["video_paths"] in first_line:
            report.skip(line, rec["video_paths"], DUPLICATE, f"first listed at line {first_line[rec['video_paths']]}")
        else:
            try:
                refs = _ref_list(rec["ref_video_paths"])
            except ValueError as e:  # json.JSONDecodeError included
                report.skip(line, rec["video_paths"], INVALID, f"ref_video_paths {rec['ref_video_paths']!r}: {e}")
                continue
            first_line[rec["video_paths"]] = line
            rows.append(Row(line, rec["video_paths"], refs, rec["tar_video_caption"] or "", rec["kind"], rec["split"]))
    return rows


def _references(row: Row, alive: set[str], by_kind: dict[str, list[str]], rng: np.random.Generator) -> list[str]:
    refs = [p for p in row.refs if p in alive and p != row.path]
    if refs:
        return refs
    pool = [p for p in by_kind[row.kind] if p != row.path]
    return [pool[rng.integers(len(pool))]] if pool else []


def assign_references(rows: Sequence[Row], seed: int, report: Report) -> list[tuple[Row, list[str]]]:
    """(row, reference paths) for the rows that keep a reference.

    The official rule, repeated until no row is dropped: dropping a row can leave another row, whose only
    reference it was, empty (the official loader keeps such dangling paths; here every reference must
    be an example).
    """
    rows = list(rows)
    while True:
        by_kind = collections.defaultdict(list)
        for r in rows:
            by_kind[r.kind].append(r.path)
        alive, rng = {r.path for r in rows}, np.random.default_rng(seed)
        refs = [_references(r, alive, by_kind, rng) for r in rows]
        if all(refs):
            return list(zip(rows, refs))
        for r, found in zip(rows, refs):
            if not found:
                report.skip(r.line, r.path, NO_REFERENCE, f"no surviving reference and no other {r.kind!r} video")
        rows = [r for r, found in zip(rows, refs) if found]


# ---------------------------------------------------------------------------------------------------
# Builder


class VapData(tfds.core.GeneratorBasedBuilder):
    """VAP-Data clips with their reference indices; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Pass the VAP-Data folder ({CSV_NAME} and its videos) as manual_dir."
    BUILDER_CONFIGS = [
        make_config(name="49x480x720"),                           # CogVideoX single-node recipe
        make_config(score_threshold=10, name="49x480x720_score10"),  # multi-node / 3-ref recipes
        make_config(49, 480, 832, score_threshold=10, name="49x480x832_score10"),  # Wan recipes
        make_config(all_splits=True, name="49x480x720_all"),     # DPO: candidates of every split
        make_config(9, 64, 96, name="tiny"),                      # tests and demos
        make_config(9, 64, 96, name="tiny_all", all_splits=True),
    ]

    def __init__(self, *, workers: int | None = None, **kwargs):
        self._workers = workers or min(8, os.cpu_count() or 1)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description="Video-As-Prompt training clips with the indices of their reference clips.",
            features=tfds.features.FeaturesDict({
                # Uncompressed: TFDS's zlib runs in its single writer thread (~3 s per 49x480x720 clip).
                "video": tfds.features.Tensor(shape=(c.frames, c.height, c.width, 3), dtype=np.uint8,
                                              encoding="bytes"),
                "caption": tfds.features.Text(),
                "kind": tfds.features.Text(),
                "path": tfds.features.Text(),
                "split": tfds.features.Text(),
                "ref_index": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            }),
            disable_shuffling=True,  # examples stay in CSV order: `ref_index` addresses positions
            metadata=tfds.core.MetadataDict(all_splits=c.all_splits),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, root: str):
        cfg, report = self.builder_config, Report()
        rows = select_rows(read_csv(os.path.join(root, CSV_NAME)), cfg.score_threshold, report, cfg.all_splits)
        problems = _ordered_map(lambda r: _video_problem(root, r, cfg), rows, self._workers)
        usable = []
        for row, problem in zip(rows, tqdm(problems, total=len(rows), desc="vap_data: checking videos")):
            if problem:
                report.skip(row.line, row.path, *problem)
            else:
                usable.append(row)
        pairs = assign_references(usable, cfg.seed, report)
        summary = report.summary(len(pairs))
        (log.warning if report.skipped else log.info)(summary)
        self.info.metadata.update(report=report.to_json(), summary=summary,
                                  min_refs=min((len(refs) for _, refs in pairs), default=0))
        index = {row.path: i for i, (row, _) in enumerate(pairs)}
        clips = _ordered_map(lambda pair: self._clip(root, pair[0]), pairs, self._workers)
        for i, ((row, refs), clip) in enumerate(zip(pairs, clips)):
            yield i, {"video": clip, "caption": row.caption, "kind": row.kind, "path": row.path,
                      "split": row.split, "ref_index": np.array([index[p] for p in refs], np.int64)}

    def _clip(self, root: str, row: Row) -> np.ndarray:
        try:
            return load_clip(os.path.join(root, row.path), self.builder_config)
        except video.VideoError as e:
            raise RuntimeError(f"CSV line {row.line}: {e}: it decoded in the check pass; did the file change "
                               "during the build?") from e


def build(manual_dir: str, data_dir: str, config: str | VapDataConfig = "49x480x720",
          workers: int | None = None) -> VapData:
    """Build (or reuse) the dataset under data_dir; returns the prepared builder."""
    builder = VapData(config=config, data_dir=data_dir, file_format="array_record", workers=workers)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build the vap_data TFDS dataset from a VAP-Data folder.")
    p.add_argument("--manual_dir", required=True, help=f"the VAP-Data folder ({CSV_NAME} + videos)")
    p.add_argument("--data_dir", required=True, help="TFDS data_dir to write to")
    p.add_argument("--config", default="49x480x720", help=f"one of {[c.name for c in VapData.BUILDER_CONFIGS]}")
    p.add_argument("--score_threshold", type=float, help="overrides the config's (a custom config is built)")
    p.add_argument("--all_splits", action="store_true",
                   help="keep the rows of every split (the DPO candidate pools), not only 'train'")
    p.add_argument("--workers", type=int, help="decoding threads (default min(8, CPUs))")
    args = p.parse_args(argv)
    config = args.config
    if args.score_threshold is not None or args.all_splits:
        base = VapData.builder_configs[args.config]
        threshold = base.score_threshold if args.score_threshold is None else args.score_threshold
        config = make_config(base.frames, base.height, base.width, base.fps, threshold,
                             all_splits=args.all_splits or base.all_splits)
    builder = build(args.manual_dir, args.data_dir, config, args.workers)
    print(builder.info.metadata["summary"])
    print(f"dataset: {builder.data_dir}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main()
