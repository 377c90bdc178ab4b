"""sample.py end to end on the tiny random-weight config, and its one-line errors on bad input."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, golden_dir
from vapjax.video import read_video


def sample(*overrides):
    args = [sys.executable, "sample.py", "--config", "configs/cog_vap_tiny.py", *overrides]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_tiny_sample_writes_video_deterministically(tmp_path):
    outs = []
    for name in ("a.mp4", "b.mp4"):
        run = sample(f"--config.output={tmp_path / name}")
        assert run.returncode == 0, run.stderr[-2000:]
        assert "wrote" in run.stdout and "time:" in run.stdout and "memory:" in run.stdout
        frames, fps = read_video(tmp_path / name)
        assert frames.shape == (9, 64, 96, 3) and fps == 16
        outs.append(frames)
    np.testing.assert_array_equal(outs[0], outs[1])  # same seed, same frames
    assert outs[0].std() > 1  # not a constant image


@pytest.mark.parametrize("overrides,message", [
    (["--config.image=/nonexistent/cat.png"], "/nonexistent/cat.png"),
    (["--config.ref_video={garbage}"], "garbage.mp4"),
    (["--config.num_frames=17"], "17"),
    (["--config.height=60"], "60x96"),
    (["--config.num_frames=10"], "4k+1"),
    (["--config.random_init=False", "--config.checkpoint={golden}"], "python -m convert"),
    (["--config.random_init=False", "--config.checkpoint=/nonexistent/ckpt"], "no such checkpoint folder"),
])
def test_bad_input_one_line_error(tmp_path, overrides, message):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video")
    golden = golden_dir() / "cog_pipeline_tiny"
    run = sample(*[o.format(garbage=garbage, golden=golden) for o in overrides])
    assert run.returncode == 2, run.stderr[-2000:]
    err = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr
