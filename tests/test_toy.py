"""VAP-Toy: the world, the oracle, the shipped trained default, sample.py's toy demo and evaluate.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from vapjax.toy import evaluate, world
from vapjax.toy.oracle import Oracle
from vapjax.video import read_video

TOY = ROOT / "vapjax" / "assets" / "toy"


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------

def test_world_is_deterministic():
    a, b = world.pairs("train", 4, seed=3), world.pairs("train", 4, seed=3)
    assert a == b
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.target_clip(), q.target_clip())
        np.testing.assert_array_equal(p.reference_clip(), q.reference_clip())
    assert world.pairs("train", 4, seed=4) != a


def test_every_condition_starts_from_the_scene_and_changes_it():
    scene = world.sample_scene(np.random.default_rng(1))
    still = world.render(scene, None)
    assert (still == still[:1]).all()  # no condition: a still clip
    for name in world.CONDITIONS:
        clip = world.render(scene, name, seed=2)
        assert clip.shape == (world.FRAMES, world.HEIGHT, world.WIDTH, 3) and clip.dtype == np.uint8
        np.testing.assert_array_equal(clip[0], still[0], err_msg=name)  # image-to-video: frame 0 is the image
        change = np.abs(clip.astype(int) - still.astype(int)).max(axis=(1, 2, 3))
        assert change[1:].max() > 60, name  # the condition visibly acts (bounce returns to its start)


def test_conditions_cover_the_four_families_and_splits_are_disjoint():
    fams = {c.family for c in world.CONDITIONS.values()}
    assert fams == set(world.FAMILIES) and len(world.CONDITIONS) >= 16
    assert set(world.SEEN).isdisjoint(world.UNSEEN)
    assert {world.CONDITIONS[n].family for n in world.UNSEEN} == fams  # one zero-shot condition per family
    train = {p.target.combo for p in world.pairs("train", 300, 0)} | {p.reference.combo for p in world.pairs("train", 300, 0)}
    held = {p.target.combo for p in world.pairs("heldout_scenes", 100, 0)}
    assert train.isdisjoint(held) and all(world.is_heldout_combo(*c) for c in held)
    assert {p.condition for p in world.pairs("unseen_conditions", 8, 0)} == set(world.UNSEEN)


def test_captions_name_the_effect_unless_stripped():
    p = world.pairs("train", 1, 0, conditions=["zoom_in"])[0]
    ref, tgt = p.captions()
    assert ref.endswith("The camera zooms in.") and tgt.endswith("The camera zooms in.")
    ref, stripped = p.captions(strip_effect=True)
    assert ref.endswith("The camera zooms in.") and "zoom" not in stripped and stripped == world.describe(p.target)
    ref, _ = p.captions(strip_effect=True, strip_reference=True)
    assert ref == world.describe(p.reference)


# ---------------------------------------------------------------------------------------------
# The oracle and the shipped default
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle():
    return Oracle.load(str(TOY / "oracle.npz"))


def test_oracle_reads_ground_truth(oracle):
    """≥ 98 % on ground-truth clips of held-out scenes, over every condition (seen and unseen)."""
    rng = np.random.default_rng(123)
    names = list(world.CONDITIONS) * 6
    clips = np.stack([world.render(world.sample_scene(rng, "heldout"), n, seed=i) for i, n in enumerate(names)])
    accuracy = np.mean(np.array(oracle.read(clips)) == np.array(names))
    assert accuracy >= 0.98, accuracy


def test_shipped_default_is_small():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TOY) for f in fs)
    assert size <= 20 * 2 ** 20, size


@pytest.fixture(scope="module")
def pipeline():
    from vapjax.pipelines.cogvideox_vap import CogVideoXVAP
    return CogVideoXVAP.load(str(TOY / "pipeline"))


def test_shipped_default_transfers_semantics(pipeline, oracle):
    """A fixed evaluation subset: two held-out-scene pairs per seen condition, both captions stripped of
    their effect words, so that only the reference *video* can carry the semantics. The output reads as
    the reference's condition (alignment), follows a swapped reference (sensitivity), and the frozen
    backbone alone does not. Thresholds: see the measured numbers in the README."""
    r = evaluate.evaluate_split(pipeline, oracle, "heldout_scenes", 2 * len(world.SEEN), seed=0,
                                ref_caption="stripped", log=lambda s: None)
    m, style = r["overall"], r["families"]["style"]
    chance = 1 / len(world.SEEN)
    assert m["oracle_on_reference"] >= 0.95, m
    # Measured on this subset: alignment 6/36, sensitivity 8/36, the backbone alone 1/36 (chance 2/36);
    # style 3/8 against 0/8. Over 200 pairs x 3 seeds: 0.222 / 0.217 / 0.053 (README). The 0.8
    # targets are NOT met (README, VAP-Toy): motion and concept do not transfer yet. The bars below fail
    # for a model that ignores its reference video.
    assert m["alignment"] >= 2 * chance and m["sensitivity"] >= 2 * chance, m
    assert m["backbone"] <= 2 * chance and m["alignment"] - m["backbone"] >= 2 * chance, m
    assert style["alignment"] >= 0.25 and style["backbone"] <= 0.25 * style["alignment"], style
    assert m["first_frame_psnr"] >= 18, m  # the output starts from the given image (VAE round trip ≈ 20 dB)


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------

def test_sample_writes_reference_beside_generated(tmp_path):
    out = tmp_path / "toy.mp4"
    run = subprocess.run([sys.executable, "sample.py", "--config", "configs/toy_vap.py", f"--config.output={out}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    frames, _ = read_video(out)
    assert frames.shape == (world.FRAMES, world.HEIGHT, 2 * world.WIDTH, 3)
    demo = json.loads((TOY / "demo.json").read_text())
    want = demo["condition"].replace("_", " ")
    assert f"oracle: reference: {want} — generated: {want}" in run.stdout, run.stdout


def test_evaluate_writes_table_and_plot(tmp_path, pipeline, oracle):
    summary = evaluate.run(str(TOY / "pipeline"), str(TOY / "oracle.npz"), str(tmp_path), splits=["unseen_conditions"],
                           pairs=4, seeds=[0, 1], steps=2, ref_caption="stripped", log=lambda s: None)
    table = (tmp_path / "results.md").read_text()
    assert "| overall |" in table and "| style |" in table and "±" in table
    assert (tmp_path / "results.png").stat().st_size > 1000
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ref_caption"] == "stripped"
    runs = results["runs"]["unseen_conditions"]
    assert set(runs) == {"0", "1"} and set(summary["unseen_conditions"]["overall"]) >= {"alignment", "sensitivity", "psnr"}
    with pytest.raises(ValueError, match="ref_caption"):
        evaluate.evaluate_split(pipeline, oracle, "unseen_conditions", 1, 0, ref_caption="none")


@pytest.mark.parametrize("args,message", [
    (["--pairs", "-1"], "--pairs -1: must be at least 1"),
    (["--unseen-pairs", "0"], "--unseen-pairs 0: must be at least 1"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--seeds", "x"], "--seeds 'x': expected comma-separated integers"),
    (["--seeds", ","], "--seeds ',': expected at least one seed"),
    (["--pairs", "x"], "argument --pairs: invalid int value: 'x'"),
])
def test_evaluate_flags_are_one_line_errors(tmp_path, capsys, args, message):
    """Checked before any model loads: one line naming the flag, exit status 2."""
    with pytest.raises(SystemExit) as e:
        evaluate.main([*args, "--pipeline", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_diagnose_the_shipped_default(tmp_path, capsys):
    """`python -m vapjax.toy.diagnose`, in process, on a workdir made from the shipped default (2 clips per
    condition): at high noise the right reference lowers the training loss below no reference and below
    a wrong one (the expert reads the video; measured 0.037 / 0.110 / 0.130 over 96 pairs), the backbone
    reads its full caption, and a sample starts from its image where the still video is exact."""
    from vapjax.toy import diagnose
    work, out = tmp_path / "work", tmp_path / "out"
    diagnose.main(["--from-default", "--config", str(ROOT / "configs" / "toy_build.py"), "--workdir", str(work),
                   "--out", str(out), "--pool", "2", "--pairs", "32", "--clips", "8", "--sample-steps", "2"])
    assert "### Reference gain" in capsys.readouterr().out
    result = json.loads((out / "diagnose.json").read_text())
    high = result["reference_gain"]["700-1000"]
    assert high["right"] < 0.7 * high["none"] and high["right"] < 0.7 * high["wrong"], high
    assert high["backbone_full_caption"] < 0.7 * high["none"], high
    for family in result["rendering"].values():
        assert family["still"][0] == 0 and family["sample"][0] < 0.05, family  # frame 0 is the given image
    with pytest.raises(SystemExit) as bad:
        diagnose.main(["--workdir", str(tmp_path / "nothing")])
    assert bad.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_ablation_study_smoke(tmp_path):
    """`python -m vapjax.toy.ablate --from-default` on a tiny budget: a workdir made from the shipped
    default, one variant x two seeds trained and evaluated (the second seed loads the first's compiled
    programs), and the table (mean ± std over seeds, the paper's score beside), its JSON and its plot
    written; the per-run cache makes a second call reuse every run."""
    from vapjax.toy import ablate
    work, out = tmp_path / "work", tmp_path / "out"
    args = [sys.executable, "-m", "vapjax.toy.ablate", "--from-default", "--workdir", str(work), "--out", str(out),
            "--pool", "2", "--variants", "residual_addition", "--seeds", "0,1", "--steps", "2", "--pairs", "2",
            "--sample-steps", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (out / "ablation.md").read_text()
    assert table in run.stdout
    row, families = [line for line in table.splitlines() if line.startswith("| residual_addition |")]
    assert row.startswith("| residual_addition | 0,1 |") and row.endswith("| 55.99 |"), table  # seeds, the paper's
    assert row.count("±") == len(ablate.METRICS), table                                    # metrics
    assert families.count("±") >= 1, table                                            # alignment per family
    result = json.loads((out / "ablation.json").read_text())
    assert set(result["runs"]) == {"residual_addition"}
    assert all(set(r) == {"0", "1"} for r in result["runs"].values())
    assert (out / "ablation.png").stat().st_size > 0
    assert sorted(os.listdir(work / "backbone")) == ["text_encoder", "transformer"]
    (cache,) = (out / "runs").iterdir()  # keyed by the budget
    mtimes = {p: p.stat().st_mtime for p in cache.iterdir()}
    assert len(mtimes) == 2
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "step 0" not in run.stderr + run.stdout  # every run cached: nothing retrained
    assert {p: p.stat().st_mtime for p in cache.iterdir()} == mtimes
    bad = subprocess.run(args[:3] + ["--from-default", "--workdir", str(tmp_path / "w2"), "--pool", "1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --pool 1"), bad.stderr[-2000:]
