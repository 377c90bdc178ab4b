"""sample.py end to end on the tiny random-weight configs (CogVideoX and Wan), and its one-line errors
on bad input."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest

import sample
from configs import cog_vap, cog_vap_tiny, wan_vap_tiny
from conftest import ROOT, golden_dir
from vapjax import video
from vapjax.models import cogvideox, cogvideox_vae
from vapjax.pipelines.cogvideox_vap import CogVideoXVAP, Component, Output
from vapjax.tokenizer import T5Tokenizer
from vapjax.video import VideoError, read_video


def sample_cli(*overrides, config="configs/cog_vap_tiny.py"):
    args = [sys.executable, "sample.py", "--config", config, *overrides]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_tiny_sample_writes_video_deterministically(tmp_path):
    outs = []
    for name in ("a.mp4", "b.mp4"):
        run = sample_cli(f"--config.output={tmp_path / name}")
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
    (["--config.frames_selection=first", "--config.num_frames=17"], "demo_ref.mp4: needs at least 17 frames"),
    (["--config.height=60"], "60x96"),
    (["--config.num_frames=10"], "4k+1"),
    (["--config.checkpoint=/some/ckpt"], "checkpoint=/some/ckpt has no effect with random_init=True"),
    (["--config.random_init=False", "--config.checkpoint={golden}"], "python -m convert"),
    (["--config.random_init=False", "--config.checkpoint=/nonexistent/ckpt"], "no such checkpoint folder"),
])
def test_bad_input_one_line_error(tmp_path, overrides, message):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video")
    golden = golden_dir() / "cog_pipeline_tiny"
    run = sample_cli(*[o.format(garbage=garbage, golden=golden) for o in overrides])
    assert run.returncode == 2, run.stderr[-2000:]
    err = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("change,message", [
    (dict(checkpoint="ckpt/vap"), "--config.checkpoint=ckpt/vap has no effect with random_init=True"),
    (dict(guidance_scale=1.0), "dynamic_cfg=True has no effect with guidance_scale=1.0"),
    (dict(frames_selection="first", frames_per_reference_length=True), "frames_per_reference_length=True has no"),
    (dict(random_init=False), "no checkpoint"),
])
def test_settings_that_cannot_take_effect_are_errors(change, message):
    c = cog_vap_tiny.get_config()
    sample.check_settings(c)  # the tiny config as shipped is fine
    c.update(change)
    with pytest.raises(ValueError, match=message) as info:
        sample.check_settings(c)
    assert "\n" not in str(info.value)


class _ShapeOnlyPipeline(CogVideoXVAP):
    """The 5B pipeline's validation without its weights (the tiny golden tokenizer); the call returns
    blank frames."""

    def __init__(self):
        self.transformer = Component(cogvideox.CogVideoXConfig(), None)
        tokenizer = T5Tokenizer.from_folder(str(golden_dir() / "cog_pipeline_tiny" / "tokenizer"))
        self.encoders = SimpleNamespace(vae_config=cogvideox_vae.VAEConfig(), tokenizer=tokenizer,
                                        tokenize=lambda texts, length: tokenizer(list(texts), length))

    def __call__(self, image, refs, req, progress=None):
        self.picks = video.select_reference_frames([len(r) for r in refs], req.num_frames, req.frames_selection)
        return Output(frames=np.zeros((req.num_frames, 8, 8, 3), np.float32), latents=None)


def test_short_demo_reference_with_the_full_config(tmp_path, monkeypatch):
    """configs/cog_vap.py (49 frames) with the bundled 13-frame demo reference: 'evenly' repeats frames
    (as the official pipeline) instead of refusing the reference."""
    tiny = cog_vap_tiny.get_config()
    c = cog_vap.get_config()
    c.update(dict(checkpoint="ckpt/vap", image=tiny.image, ref_video=tiny.ref_video, prompt=tiny.prompt,
                  ref_prompt=tiny.ref_prompt, output=str(tmp_path / "out.mp4")))
    pipe = _ShapeOnlyPipeline()
    monkeypatch.setattr(sample, "build_pipeline", lambda c: pipe)
    monkeypatch.setattr(sample, "resolve_checkpoint", lambda ref: ref)  # "ckpt/vap" is not a Hub id here
    sample.run(c)
    assert len(read_video(tiny.ref_video)[0]) == 13
    np.testing.assert_array_equal(pipe.picks[0], np.floor(np.linspace(0, 12, 49)).astype(int))
    assert (tmp_path / "out.mp4").exists()


def _full_config(tmp_path, **change):
    tiny = cog_vap_tiny.get_config()
    c = cog_vap.get_config()
    c.update(dict(checkpoint="ckpt/vap", image=tiny.image, ref_video=tiny.ref_video, prompt=tiny.prompt,
                  ref_prompt=tiny.ref_prompt, output=str(tmp_path / "out.mp4")))
    c.update(change)
    return c


@pytest.mark.parametrize("change,error,message", [
    (dict(output="{tmp}"), VideoError, "is a folder, not a video file name"),
    (dict(output="{tmp}/out.gif"), VideoError, "cannot write a video of this type"),
    (dict(output="{tmp}/afile/out.mp4"), VideoError, "afile is a file, not a folder"),
    (dict(steps=0), ValueError, "steps=0: must be a whole number >= 1"),
])
def test_bad_output_and_steps_fail_before_the_model_loads(tmp_path, monkeypatch, change, error, message):
    (tmp_path / "afile").write_text("")
    c = _full_config(tmp_path, **{k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in change.items()})
    monkeypatch.setattr(sample, "build_pipeline", lambda c: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sample, "resolve_checkpoint", lambda ref: pytest.fail("the checkpoint was resolved"))
    with pytest.raises(error, match=message) as e:
        sample.run(c)
    assert "\n" not in str(e.value)


def test_blank_reference_caption_and_notes(tmp_path, monkeypatch, capsys):
    """A blank ref_prompt is a blank caption (not "0 reference prompts"); a prompt cut to the text length
    and an image whose aspect ratio the resize changes each get a one-line note."""
    square = tmp_path / "square.png"
    iio.imwrite(square, np.full((64, 64, 3), 128, np.uint8))
    pipe = _ShapeOnlyPipeline()
    monkeypatch.setattr(sample, "build_pipeline", lambda c: pipe)
    monkeypatch.setattr(sample, "resolve_checkpoint", lambda ref: ref)
    blank_negatives = dict(negative_prompt="", negative_ref_prompt="")
    sample.run(_full_config(tmp_path, ref_prompt="", prompt="a ball " * 40, max_sequence_length=16, **blank_negatives))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: the prompt is longer than the 16 tokens the model reads; the rest is cut off"]
    assert sample.make_request(_full_config(tmp_path, ref_prompt=""), "cogvideox").ref_prompts == ("",)
    sample.run(_full_config(tmp_path, image=str(square), **blank_negatives))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "the image is 64x64 (aspect 1.00); it is resized to 720x480 (aspect 1.50)" in notes[0]


# ---------------------------------------------------------------------------------------------------
# Wan

WAN_TINY = "configs/wan_vap_tiny.py"


def test_wan_tiny_sample_writes_video(tmp_path):
    run = sample_cli(f"--config.output={tmp_path / 'wan.mp4'}", config=WAN_TINY)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wrote" in run.stdout and "memory:" in run.stdout
    frames, fps = read_video(tmp_path / "wan.mp4")
    c = wan_vap_tiny.get_config()
    assert frames.shape == (c.num_frames, c.height, c.width, 3) and fps == c.fps
    assert frames.std() > 1  # not a constant image


def fake_converted_pipeline(path, kind):
    """A folder that names a transformer kind and nothing else (family checks read only that)."""
    (path / "transformer").mkdir(parents=True)
    (path / "pipeline.json").write_text("{}")
    (path / "transformer" / "config.json").write_text(json.dumps({"vapjax_component": kind, "format": 1, "config": {}}))
    return path


@pytest.mark.parametrize("overrides,message", [
    (["--config.image=/nonexistent/cat.png"], "/nonexistent/cat.png"),
    (["--config.ref_video={garbage}"], "garbage.mp4"),
    (["--config.height=40"], "40x96: height and width must be positive multiples of 16"),
    (["--config.num_frames=10"], "4k+1"),
    (["--config.ref_video={demo}|{demo}", "--config.ref_prompt=a|b"], "2 reference videos: Wan-VAP takes exactly one"),
    (["--config.random_init=False", "--config.checkpoint={cog}"], "a cogvideox checkpoint, but this config is for wan"),
    (["--config.random_init=False", "--config.checkpoint={golden}"], "python -m convert"),
])
def test_wan_bad_input_one_line_error(tmp_path, overrides, message):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video")
    cog = fake_converted_pipeline(tmp_path / "cog", "cogvideox_transformer")
    values = dict(garbage=garbage, demo=wan_vap_tiny.get_config().ref_video, cog=cog,
                  golden=golden_dir() / "wan_pipeline_tiny")
    run = sample_cli(*[o.format(**values) for o in overrides], config=WAN_TINY)
    assert run.returncode == 2, run.stderr[-2000:]
    err = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_family_from_checkpoint_and_settings_of_another_family(tmp_path):
    """An empty `family` takes the converted checkpoint's; a setting the family's Request lacks is an error."""
    c = wan_vap_tiny.get_config()
    c.update(dict(family="", random_init=False, checkpoint=str(fake_converted_pipeline(tmp_path, "wan_transformer"))))
    assert sample.family_name(c) == "wan"
    assert sample.make_request(c, "wan").ref_prompts == (c.ref_prompt,)
    c.dynamic_cfg = False  # a CogVideoX setting
    with pytest.raises(ValueError, match="setting\\(s\\) dynamic_cfg do not apply to the wan pipeline"):
        sample.make_request(c, "wan")


def test_hub_cache_is_keyed_on_commit_and_converter_version(tmp_path, monkeypatch):
    """A Hub checkpoint is converted once per (commit, converter format version), keeping the source's
    dtype; a converter change converts again instead of reusing the stale copy."""
    import huggingface_hub  # noqa: PLC0415
    import convert  # noqa: PLC0415
    snapshot = tmp_path / "hub" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, revision=None: str(snapshot))
    monkeypatch.setenv("VAPJAX_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src, dst, **kw):
        calls.append((src, dst, kw))
        os.makedirs(dst)
        open(os.path.join(dst, "pipeline.json"), "w").close()

    monkeypatch.setattr(sample.convert_cli, "convert_folder", fake_convert)
    first = sample.resolve_checkpoint("Org/Model")
    assert sample.resolve_checkpoint("Org/Model") == first and len(calls) == 1
    assert calls[0][0] == str(snapshot) and calls[0][2] == {}  # no dtype forced: bf16 stays bf16
    monkeypatch.setattr(convert, "FORMAT_VERSION", convert.FORMAT_VERSION + 1)
    second = sample.resolve_checkpoint("Org/Model")
    assert second != first and "abc123" in second and len(calls) == 2


def test_config_flag_mistakes_are_one_line_in_every_entry_point(capsys):
    """Every entry point with a --config file parses it through vapjax.cli: an unknown field is one line
    that keeps ml_collections' "did you mean" hint (not a 50-line traceback), a bad value too; exit 2."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415
    from vapjax import cli  # noqa: PLC0415
    for override, message in [("--config.stepz=3", "no config field 'stepz'; Did you mean \"steps\" instead of \"stepz\"?"),
                              ("--config.steps=x", "flag --config.steps=x: invalid literal for int() with base 10: 'x'")]:
        argv = ["sample.py", "--config", str(ROOT / "configs" / "cog_vap_tiny.py"), override]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", lock_config=False, flag_values=fv, sys_argv=argv)
        with pytest.raises(SystemExit) as e:
            cli.parse_flags(argv, fv)
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    users = [p for p in ROOT.rglob("*.py") if "DEFINE_config_file" in p.read_text() and p.parent.name != "tests"]
    assert sorted(str(p.relative_to(ROOT)) for p in users) == ["vapjax/cli.py"]
    for script in ("sample.py", "train.py", "vapjax/toy/build.py"):
        assert "cli.run(main, " in (ROOT / script).read_text(), script
