"""Image/video I/O, the reference's frame selection and fps resampling, resizing and pixel scaling."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from conftest import golden_dir
from vapjax.numerics import torch_linspace
from vapjax.video import (VideoError, read_image, read_video, require_frames, resample_fps, resize,
                          select_frames, select_reference_frames, to_model_range, write_video)



def _smooth_video(f: int, h: int, w: int) -> np.ndarray:
    """Gradients that move over time: easy on a lossy codec, so a round trip stays close."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [(np.stack([x * 255 / w, y * 255 / h, np.full((h, w), 20.0 * k)], -1)) for k in range(f)]
    return np.clip(frames, 0, 255).astype(np.uint8)


def _one_line_naming(exc: VideoError, path) -> None:
    message = str(exc)
    assert "\n" not in message and str(path) in message, message


def test_mp4_round_trip(tmp_path):
    frames = _smooth_video(6, 32, 48)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=16)
    got, fps = read_video(path)
    assert got.shape == frames.shape and got.dtype == np.uint8 and fps == 16
    assert np.abs(got.astype(int) - frames).mean() < 3  # lossy H.264


def test_write_float_frames_and_odd_size(tmp_path):
    frames = _smooth_video(3, 33, 47)
    path = tmp_path / "odd.mp4"
    write_video(path, frames.astype(np.float32) / 255, fps=8)
    got, fps = read_video(path)
    # yuv420p needs even sizes: one edge row/column is replicated, nothing is rescaled.
    assert got.shape == (3, 34, 48, 3) and fps == 8
    assert np.abs(got[:, :33, :47].astype(int) - frames).mean() < 3


def test_read_golden_reference_video():
    case = golden_dir() / "cog_pipeline_tiny"
    assert (case / "ref_video.mp4").exists(), f"golden case {case} not found (set VAPJAX_GOLDEN_DIR)"
    frames, fps = read_video(case / "ref_video.mp4")
    assert frames.shape == (13, 64, 96, 3) and fps == 8
    image = read_image(case / "image.png")
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8


def test_read_image_drops_alpha(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])


def test_select_frames_golden():
    want = [0, 1, 3, 4, 6, 7, 9, 10, 12]
    np.testing.assert_array_equal(select_frames(13, 9), want)
    case = golden_dir() / "cog_pipeline_tiny" / "case.json"
    if case.exists():
        assert json.loads(case.read_text())["frame_indices"] == want
    np.testing.assert_array_equal(select_frames(13, 9, "first"), np.arange(9))
    np.testing.assert_array_equal(select_frames(5, 9, "first"), np.arange(5))
    np.testing.assert_array_equal(select_frames(7, 1), [0])


def test_select_frames_evenly_is_floor_of_torch_linspace():
    """.long() of the float32 torch.linspace: the linspace itself is pinned bit for bit against torch
    (these very ranges are recorded cases of tests/test_numerics.py), whatever CPU runs the test."""
    for n_total in range(1, 400):
        for n in (9, 13, 49, 121):
            want = np.floor(torch_linspace(0, n_total - 1, n, np.float32)).astype(np.int64)
            np.testing.assert_array_equal(select_frames(n_total, n), want, err_msg=f"{n_total}->{n}")
    # 0..48 in 49 steps is the identity; 0..4 in 9 steps repeats frames (a short reference).
    np.testing.assert_array_equal(select_frames(49, 49), np.arange(49))
    np.testing.assert_array_equal(select_frames(5, 9), [0, 0, 1, 1, 2, 2, 3, 3, 4])


def test_random_selection_is_official_and_seeded():
    """Official "random" (CPIPE:900-904): n consecutive frames from random.randint(0, L − n), one draw per
    reference in order; ours draws from random.Random(seed)."""
    picks = [select_reference_frames([39, 20], 9, "random", seed=s) for s in range(6)]
    for p in picks:
        for ix, length in zip(p, (39, 20)):
            assert np.all(np.diff(ix) == 1) and len(ix) == 9 and 0 <= ix[0] <= length - 9
    assert len({int(p[0][0]) for p in picks}) > 1                    # the seed matters
    r = random.Random(3)
    assert [int(ix[0]) for ix in picks[3]] == [r.randint(0, 30), r.randint(0, 11)]
    with pytest.raises(ValueError, match="reference video 1 has 5 frames; frames_selection='random' needs 9"):
        select_reference_frames([39, 5], 9, "random")
    with pytest.raises(ValueError, match="frames_selection='middle'"):
        select_reference_frames([39], 9, "middle")


@pytest.mark.parametrize("n, fps, want", [
    (5, 16, [0, 1, 2, 3, 4]),            # already at 16 fps
    (10, 32, [0, 2, 4, 7, 9]),           # round(linspace(0, 9, 5)) = 0, 2.25→2, 4.5→4 (half to even), 6.75→7, 9
    (4, 8, [0, 1, 2, 3]),                # upsampling repeats indices; repeats are dropped
    (5, 30, [0, 4]),                     # int(5 · 16/30) = 2
    (1, 30, [0]),                        # fewer than one frame left: the middle frame
    (3, 60, [1]),
])
def test_resample_fps(n, fps, want):
    np.testing.assert_array_equal(resample_fps(n, fps), want)


def test_resample_fps_30_to_16():
    got = resample_fps(49, 30)
    assert len(got) == int(49 * (16 / 30)) and got[0] == 0 and got[-1] == 48
    assert np.all(np.diff(got) > 0)


def test_resize():
    frames = _smooth_video(2, 16, 24)
    same = resize(frames, 16, 24)
    assert same is not frames and np.array_equal(same, frames)
    for method, pil in (("lanczos", Image.Resampling.LANCZOS), ("bicubic", Image.Resampling.BICUBIC)):
        out = resize(frames, 10, 30, method)
        assert out.shape == (2, 10, 30, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[1], np.asarray(Image.fromarray(frames[1]).resize((30, 10), pil)))
    assert resize(frames[0], 8, 12).shape == (8, 12, 3)
    with pytest.raises(ValueError, match="method"):
        resize(frames, 8, 12, "nearest")


def test_to_model_range():
    pixels = np.arange(256, dtype=np.uint8)
    got = to_model_range(pixels)
    assert got.dtype == np.float32 and got[0] == -1 and got[-1] == 1
    np.testing.assert_array_equal(got, pixels.astype(np.float32) / np.float32(255) * np.float32(2) - np.float32(1))


def test_errors_are_one_line_and_name_the_file(tmp_path):
    missing = tmp_path / "missing.mp4"
    for read in (read_video, read_image):
        with pytest.raises(VideoError, match="no such file") as info:
            read(missing)
        _one_line_naming(info.value, missing)

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="cannot read video") as info:
        read_video(garbage)
    _one_line_naming(info.value, garbage)

    good = tmp_path / "good.mp4"
    write_video(good, _smooth_video(4, 16, 16))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(VideoError) as info:
        read_video(truncated)
    _one_line_naming(info.value, truncated)

    not_image = tmp_path / "text.png"
    not_image.write_text("not an image")
    with pytest.raises(VideoError, match="cannot read image") as info:
        read_image(not_image)
    _one_line_naming(info.value, not_image)

    frames, _ = read_video(good)
    require_frames(good, frames, 4)
    with pytest.raises(VideoError, match="needs at least 49 frames, the file has 4") as info:
        require_frames(good, frames, 49)
    _one_line_naming(info.value, good)

    (tmp_path / "a_file").write_text("")  # missing folders are created, but not under a file
    unwritable = tmp_path / "a_file" / "out.mp4"
    with pytest.raises(VideoError, match="cannot write video") as info:
        write_video(unwritable, _smooth_video(2, 16, 16))
    _one_line_naming(info.value, unwritable)
