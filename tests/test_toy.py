"""VAP-Toy: the world, the oracle, the shipped trained default, sample.py's toy demo and evaluate.py."""
import hashlib
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


def test_training_scenes_show_no_heldout_combination():
    """Not as the main sprite, nor as the second one (before: 7 % of training scenes did); every held-out
    combination still occurs in held-out scenes, second sprites included."""
    rng = np.random.default_rng(5)
    scenes = [world.sample_scene(rng, "train") for _ in range(3000)]
    shown = {(sp.shape, sp.colour, sc.background) for sc in scenes for sp in sc.sprites}
    assert sum(len(sc.sprites) == 2 for sc in scenes) > 800
    assert not any(world.is_heldout_combo(*c) for c in shown)
    assert len(shown) == sum(not world.is_heldout_combo(s, c, b) for s in world.SHAPES for c in world.COLOURS
                             for b in world.BACKGROUNDS)  # and every training combination is shown


def test_heldout_split_is_the_one_the_default_was_measured_on():
    """The held-out pairs (scenes, seeds, conditions) are pinned: the README's numbers were measured on them."""
    digest = hashlib.sha256()
    for split, n in (("heldout_scenes", 200), ("unseen_conditions", 72)):
        for seed in (0, 1, 2):
            digest.update(repr(world.pairs(split, n, seed)).encode())
    assert digest.hexdigest()[:16] == "eb4d52d69ac19b15"


# ---------------------------------------------------------------------------------------------
# The metrics, on hand-built readings
# ---------------------------------------------------------------------------------------------

def test_paired_sensitivity_needs_both_outputs_right_and_counts_under_the_family_of_a():
    a = ["move_left", "invert", "zoom_in", "morph", "spin"]
    b = ["invert", "move_left", "morph", "zoom_in", "sepia"]
    read_a = ["move_left", "invert", "pan_left", "morph", "spin"]   # A right except for zoom_in
    read_b = ["move_left", "move_left", "morph", "zoom_in", "sepia"]  # B wrong for the first pair only
    hits = evaluate.paired_sensitivity(a, read_a, b, read_b)
    np.testing.assert_array_equal(hits, [False, True, False, True, True])  # A right, B wrong: 0; both: 1
    grouped = evaluate.group_by_family({"paired_sensitivity": hits}, a)
    assert grouped["overall"]["paired_sensitivity"] == pytest.approx(0.6)
    by_family = {f: m["paired_sensitivity"] for f, m in grouped["families"].items()}
    # Under A's family; under B's it would read motion 1, style 0.5, concept 0, camera 1.
    assert by_family == {"motion": 0.5, "style": 1.0, "camera": 0.0, "concept": 1.0}


@pytest.mark.parametrize("split", ["heldout_scenes", "unseen_conditions"])
def test_the_swapped_reference_is_of_another_family(split):
    candidates = world.SPLITS[split][1]
    conds = [p.condition for p in world.pairs(split, 200, 0)]
    swapped = evaluate.swap_conditions(conds, candidates, seed=0)
    assert len(swapped) == len(conds) and set(swapped) <= set(candidates)
    assert all(world.CONDITIONS[x].family != world.CONDITIONS[y].family for x, y in zip(conds, swapped))
    for fam in world.FAMILIES:  # drawn: every other family's conditions turn up
        drawn = {world.CONDITIONS[y].family for x, y in zip(conds, swapped) if world.CONDITIONS[x].family == fam}
        assert drawn == set(world.FAMILIES) - {fam}, (fam, drawn)
    assert evaluate.swap_conditions(conds, candidates, seed=0) == swapped
    assert evaluate.swap_conditions(conds, candidates, seed=1) != swapped
    with pytest.raises(ValueError, match="another family"):
        evaluate.swap_conditions(["spin"], ["move_left", "bounce"], seed=0)


def test_confusion_counts_truth_against_reading():
    truth = ["spin", "spin", "invert", "morph", "spin"]
    read = ["spin", "morph", "invert", "morph", "morph"]
    counts = evaluate.confusion(truth, read)
    labels = list(world.CONDITIONS)
    at = lambda t, r: counts[labels.index(t), labels.index(r)]  # noqa: E731
    assert counts.shape == (len(labels), len(labels)) and counts.sum() == 5
    assert (at("spin", "spin"), at("spin", "morph"), at("invert", "invert"), at("morph", "morph")) == (1, 2, 1, 1)
    assert at("morph", "spin") == 0 and np.trace(counts) == 3


class _FakeOracle:
    """Reads every clip world.render drew as its condition (recorded by `record`), anything else as
    move_down, which is never the truth on held-out scenes."""

    def __init__(self, monkeypatch):
        self.seen, render = {}, world.render

        def record(scene, condition, **kw):
            clip = render(scene, condition, **kw)
            self.seen[clip.tobytes()] = condition
            return clip
        monkeypatch.setattr(world, "render", record)

    def read(self, clips):
        return [self.seen.get(np.asarray(c).tobytes(), "move_down") for c in clips]


def test_evaluate_split_on_fake_models(monkeypatch, tmp_path):
    """evaluate_split's wiring with the generator replaced: a model that outputs its reference video
    where the reference shows a camera or style condition (else a still video), and one that ignores
    its reference (it repeats what its first references showed)."""
    oracle = _FakeOracle(monkeypatch)
    still = lambda images: np.repeat(images[:, None], world.FRAMES, axis=1)  # noqa: E731
    transfers = {"camera", "style"}

    def partial_copy(pipe, images, prompts, ref_clips=None, ref_prompts=None, **kw):
        if ref_clips is None:
            return still(images)
        keep = np.array([world.CONDITIONS[c].family in transfers for c in oracle.read(ref_clips)])
        return np.where(keep[:, None, None, None, None], ref_clips, still(images))

    monkeypatch.setattr(evaluate, "roundtrip", lambda pipe, clips: clips)
    monkeypatch.setattr(evaluate, "generate", partial_copy)
    r = evaluate.evaluate_split(None, oracle, "heldout_scenes", 18, seed=0, log=lambda s: None)
    a, b = r["pairs"]["condition"], r["pairs"]["swapped_condition"]
    fam = lambda c: world.CONDITIONS[c].family  # noqa: E731
    assert all(fam(x) != fam(y) for x, y in zip(a, b))
    assert 0 < r["overall"]["paired_sensitivity"] < r["overall"]["alignment"]  # the case tells them apart
    for f, m in r["families"].items():
        mine = [i for i, x in enumerate(a) if fam(x) == f]
        assert m["alignment"] == (1.0 if f in transfers else 0.0), f
        assert m["paired_sensitivity"] == pytest.approx(np.mean([f in transfers and fam(b[i]) in transfers for i in mine])), f
        assert m["ground_truth"] == m["vae_roundtrip"] == 1.0 and m["backbone"] == m["still"] == 0.0, f
    assert r["overall"]["psnr/vae_roundtrip"] > 90 and r["overall"]["first_frame_psnr/still"] > 90
    confusion = np.asarray(r["confusion"]["swapped"])
    labels = list(world.CONDITIONS)
    assert confusion.sum() == 18 and confusion[:, labels.index("move_down")].sum() == sum(fam(x) not in transfers for x in b)
    assert all(confusion[labels.index(x)].sum() == b.count(x) for x in set(b))  # rows: the swapped truth B

    first = {}

    def ignores(pipe, images, prompts, ref_clips=None, ref_prompts=None, **kw):
        if ref_clips is None:
            return still(images)
        return first.setdefault("clips", ref_clips)
    monkeypatch.setattr(evaluate, "generate", ignores)
    results = {"heldout_scenes": {"0": evaluate.evaluate_split(None, oracle, "heldout_scenes", 6, seed=0,
                                                               log=lambda s: None)}}
    m = results["heldout_scenes"]["0"]["overall"]
    assert m["alignment"] == 1.0 and m["paired_sensitivity"] == 0.0, m  # right once, never moved by B
    table = evaluate.markdown(evaluate.summarise(results), results)
    assert "| floor: a still video (frame 0 repeated) | 0.000 ± 0.000 |" in table
    assert "| " + evaluate.ROWS["paired_sensitivity"] + " | 0.000 ± 0.000 |" in table


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
    the reference's condition (alignment), changes when a reference of another family is swapped in, and
    the frozen backbone alone does not read right. Thresholds: see the measured numbers in the README."""
    r = evaluate.evaluate_split(pipeline, oracle, "heldout_scenes", 2 * len(world.SEEN), seed=0, ceilings=False,
                                ref_caption="stripped", log=lambda s: None)
    m, style, p = r["overall"], r["families"]["style"], r["pairs"]
    chance = 1 / len(world.SEEN)
    assert m["ground_truth"] >= 0.95 and "vae_roundtrip" not in m, m
    # Measured on this subset: alignment 6/36, the backbone alone 1/36 (chance 2/36), style 3/8 against
    # 0/8; with the swapped reference B the output reads as B 7/36 (5 of the 7 style Bs) and reads
    # differently from the first output 27/36; the paired sensitivity (both right) is 0/36 (2/54 on 54
    # pairs, README). The 0.8 targets are NOT met (README, VAP-Toy). The bars below fail for a
    # model that ignores its reference video (its two outputs are the same clip).
    changed = np.mean(np.array(p["read_vap"]) != np.array(p["read_swapped"]))
    follows = np.mean(np.array(p["read_swapped"]) == np.array(p["swapped_condition"]))
    assert m["alignment"] >= 2 * chance and follows >= 2 * chance and changed >= 0.4, (m, follows, changed)
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
    for row in evaluate.ROWS.values():  # VAP, its ceilings and its floors, in every table
        assert f"| {row} | " in table, row
    assert "| row | all | motion (move_down) | camera (shake) | style (pixelate) | concept (split) |" in table
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert (tmp_path / "confusion_unseen_conditions.png").stat().st_size > 1000
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ref_caption"] == "stripped"
    runs = results["runs"]["unseen_conditions"]
    assert set(runs) == {"0", "1"} and set(summary["unseen_conditions"]["overall"]) >= {*evaluate.ROWS, "psnr"}
    assert "sensitivity" not in summary["unseen_conditions"]["overall"]  # the old, mislabelled metric is gone
    for r in runs.values():
        assert set(r["confusion"]) == set(evaluate.METHODS) and all(np.sum(c) == 4 for c in r["confusion"].values())
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
        assert family["sample"][0] < 0.05, family  # frame 0 is the given image
        # Every family's condition changes the last latent frame: a still video misses it by far more than
        # the sample misses its given first frame (measured: concept 0.029 against 0.004, style 0.68 / 0.013).
        assert family["still"][-1] > 2 * family["sample"][0], family
    with pytest.raises(SystemExit) as bad:
        diagnose.main(["--workdir", str(tmp_path / "nothing")])
    assert bad.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_ablation_study_smoke(tmp_path, capsys):
    """`python -m vapjax.toy.ablate --from-default` on a tiny budget: a workdir made from the shipped
    default, one variant x two seeds trained and evaluated (the second seed loads the first's compiled
    programs), and the table (mean ± std over seeds, the paper's score beside), its JSON and its plot
    written; the per-run cache makes a second call reuse every run."""
    from vapjax.toy import ablate
    work, out = tmp_path / "work", tmp_path / "out"
    args = [sys.executable, "-m", "vapjax.toy.ablate", "--from-default", "--workdir", str(work), "--out", str(out),
            "--pool", "2", "--variants", "residual_addition", "--seeds", "0,1", "--steps", "2", "--pairs", "2",
            "--sample-steps", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}   # the run's compilation cache (conftest.py)
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (out / "ablation.md").read_text()
    assert table in run.stdout
    row, families = [line for line in table.splitlines() if line.startswith("| residual_addition |")]
    result = json.loads((out / "ablation.json").read_text())
    runs = result["runs"]["residual_addition"]
    for k in ablate.METRICS:  # the table shows the runs' mean ± std, metric by metric, after the seeds
        mean, std = np.mean([r[k] for r in runs.values()]), np.std([r[k] for r in runs.values()])
        assert result["summary"]["residual_addition"][k] == pytest.approx([mean, std]), k
    cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in (result["summary"]["residual_addition"][k] for k in ablate.METRICS))
    assert row.startswith(f"| residual_addition | 0,1 | {cells} |"), table
    assert families.count("±") >= 1, table                                            # alignment per family
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
    with pytest.raises(SystemExit) as bad:  # checked before any work: in process
        ablate.main(["--from-default", "--workdir", str(tmp_path / "w2"), "--pool", "1"])
    assert bad.value.code == 2 and capsys.readouterr().err.startswith("error: --pool 1")
