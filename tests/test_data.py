"""The training data pipeline on the synthetic mini VAP-Data folder: the vap_data builder (row filter,
bad-row report, pairing, clip shaping), the grain loader (determinism, sharding, resume, workers) and
the latent precompute with a tiny random-weight VAE and T5."""
import collections
import json
import logging
from functools import partial

import grain
import jax
import numpy as np
import pytest

from conftest import ROOT
from vapjax import video
from vapjax.data import loader, precompute, synthetic, vap_data
from vapjax.data.features import CogVideoXFeatures
from vapjax.encoders import Encoders
from vapjax.models import cogvideox_vae, t5
from vapjax.random_init import random_params
from vapjax.tokenizer import T5Tokenizer

OK = [c for c in synthetic.CLIPS if c.expect == "ok"]
INDEX = {c.name: i for i, c in enumerate(OK)}
SKIP_REASONS = (vap_data.MISSING, vap_data.UNREADABLE, vap_data.TOO_SHORT, vap_data.NO_REFERENCE,
                vap_data.INVALID, vap_data.DUPLICATE)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    return synthetic.write(str(tmp_path_factory.mktemp("vap") / "raw"))


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
    """(builder, log messages) of the tiny config built from the synthetic folder."""
    handler, logger = _Records(), logging.getLogger(vap_data.__name__)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        builder = vap_data.build(raw_dir, str(tmp_path_factory.mktemp("data")), "tiny", workers=2)
    finally:
        logger.removeHandler(handler)
    return builder, [r.getMessage() for r in handler.records]


@pytest.fixture(scope="module")
def examples(built):
    source = built[0].as_data_source(split="train")
    return [source[i] for i in range(len(source))]


def _ids(batches, key="index"):
    return [b[key].tolist() for b in batches]


# --- builder ---------------------------------------------------------------------------------------


def test_bad_rows_are_reported_and_skipped(built, examples):
    builder, messages = built
    assert [e["path"].decode() for e in examples] == [c.path for c in OK]
    report = loader.open_builder(builder.data_dir).info.metadata["report"]  # persisted in metadata.json
    skipped = sorted((s["path"], s["reason"]) for s in report["skipped"])
    assert skipped == sorted((c.path, c.expect) for c in synthetic.CLIPS if c.expect in SKIP_REASONS)
    filtered = collections.Counter(c.expect for c in synthetic.CLIPS if c.expect in vap_data.FILTERS)
    assert report["filtered"] == dict(filtered)
    assert report["rows"] == len(synthetic.CLIPS)
    for s in report["skipped"]:  # each one logged with its CSV line, path and reason
        assert any(f"line {s['line']} ({s['path']}): {s['reason']}" in m for m in messages), s
    summary = [m for m in messages if "CSV rows ->" in m]
    assert len(summary) == 1 and f"-> {len(OK)} examples" in summary[0] and "too few frames 2" in summary[0]


def test_pairing_rules(examples):
    kinds = [e["kind"] for e in examples]
    for i, e in enumerate(examples):
        refs = e["ref_index"].tolist()
        assert refs and i not in refs and all(kinds[r] == kinds[i] for r in refs)
    refs = {c.name: [OK[r].name for r in e["ref_index"]] for c, e in zip(OK, examples)}
    assert refs["a0"] == ["a1", "a2"]   # t0 (test split) and z0 (score 0) filtered out
    assert refs["a2"] == ["a0"]         # never itself
    assert refs["b0"] == ["b1"]         # b2 is too short
    assert refs["b1"] == ["b0"]         # empty list: same-kind fallback
    assert refs["c0"] == ["c1"]         # only broken files listed: fallback


def test_score_threshold_filter(raw_dir):
    records = vap_data.read_csv(f"{raw_dir}/vap_data.csv")
    kept = lambda t: {r.path for r in vap_data.select_rows(records, t, vap_data.Report())}
    assert "videos/z0.mp4" not in kept(0) and "videos/a0.mp4" in kept(0)   # score 0 is not > 0
    assert "videos/a0.mp4" in kept(49.9) and not kept(50)                  # strictly greater


def test_fallback_is_seeded_and_drops_cascade():
    row = lambda name, kind, refs=(): vap_data.Row(1, name, tuple(refs), "", kind)
    rows = [row("k0", "k"), row("k1", "k"), row("k2", "k"), row("solo", "s"), row("x", "x", ["solo"])]

    def draw(seed):
        report = vap_data.Report()
        return {r.path: refs for r, refs in vap_data.assign_references(rows, seed, report)}, report

    refs, report = draw(0)
    assert set(refs) == {"k0", "k1", "k2"} and all(len(f) == 1 and f[0] != p for p, f in refs.items())
    # "solo" has no reference; "x" only referenced it, so it goes too.
    assert sorted(s["path"] for s in report.skipped) == ["solo", "x"]
    assert draw(0)[0] == refs and len({str(draw(seed)[0]) for seed in range(8)}) > 1


def test_clips_are_resampled_selected_and_resized(raw_dir, examples):
    cfg = vap_data.VapData.builder_configs["tiny"]
    for name, resampled in (("a0", 12), ("a1", 13), ("b1", 20)):   # 8, 24 and 24 fps sources
        frames, fps = video.read_video(f"{raw_dir}/videos/{name}.mp4")
        kept = frames[video.resample_fps(len(frames), int(fps), 16)]
        assert len(kept) == resampled
        want = video.resize(kept[video.select_frames(len(kept), 9, "evenly")], 64, 96, "bicubic")
        got = examples[INDEX[name]]["video"]
        assert got.shape == (9, 64, 96, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(vap_data.load_clip(f"{raw_dir}/videos/{name}.mp4", cfg), want)


# --- loader ----------------------------------------------------------------------------------------


def test_raw_batches(built, examples):
    it = loader.make_loader(built[0], kind="raw", batch_size=2, seed=0)
    batch = next(it)
    assert batch["video"].shape == (2, 9, 64, 96, 3) and batch["ref_video"].shape == (2, 1, 9, 64, 96, 3)
    assert batch["caption"].shape == (2,) and batch["ref_caption"].shape == (2, 1)
    for b in range(2):
        i, r = batch["index"][b], batch["ref_index"][b, 0]
        assert r in examples[i]["ref_index"]
        np.testing.assert_array_equal(batch["video"][b], examples[i]["video"])
        np.testing.assert_array_equal(batch["ref_video"][b, 0], examples[r]["video"])
        assert batch["caption"][b] == examples[i]["caption"].decode()
        assert batch["ref_caption"][b, 0] == examples[r]["caption"].decode()   # the reference's own caption


def test_loader_is_deterministic_per_seed(built):
    take = lambda seed: [next(it) for it in [loader.make_loader(built[0], kind="raw", batch_size=2, seed=seed)]
                         for _ in range(6)]
    a, b, c = take(0), take(0), take(1)
    assert _ids(a) == _ids(b) and _ids(a, "ref_index") == _ids(b, "ref_index")
    assert all(np.array_equal(x["ref_video"], y["ref_video"]) for x, y in zip(a, b))
    assert _ids(a) != _ids(c)
    # Every epoch (3 full batches of the 7 examples, then straddling) is reshuffled.
    flat = sum(_ids(a), [])
    assert sorted(flat[:7]) == list(range(7)) and flat[:7] != flat[7:14]


def test_sharding_partitions_the_examples(built):
    def shard(index, drop):
        options = grain.sharding.ShardOptions(index, 2, drop_remainder=drop)
        it = loader.make_loader(built[0], kind="raw", batch_size=1, seed=3, num_epochs=1, shard_options=options)
        return sum(_ids(it), [])

    even = [shard(0, True), shard(1, True)]
    assert len(even[0]) == len(even[1]) == 3 and not set(even[0]) & set(even[1])
    assert sorted(shard(0, False) + shard(1, False)) == list(range(len(OK)))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        loader.make_loader(built[0], kind="raw", batch_size=4, seed=0,
                           shard_options=grain.sharding.ShardOptions(0, 2, drop_remainder=True))


def test_resume_from_saved_state(built):
    make = lambda: loader.make_loader(built[0], kind="raw", batch_size=2, seed=5)
    it = make()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(5)]   # crosses the epoch boundary
    resumed = make()
    resumed.set_state(state)
    got = [next(resumed) for _ in range(5)]
    assert _ids(got) == _ids(want) and _ids(got, "ref_index") == _ids(want, "ref_index")
    assert all(np.array_equal(g["video"], w["video"]) for g, w in zip(got, want))


def test_worker_processes_give_the_same_batches(built):
    want = _ids([next(it) for it in [loader.make_loader(built[0], kind="raw", batch_size=2, seed=0)] for _ in range(4)])
    it = loader.make_loader(built[0].data_dir, kind="raw", batch_size=2, seed=0, worker_count=1)
    try:
        assert _ids([next(it) for _ in range(4)]) == want
    finally:
        it.close()


def test_fewer_references(built, examples):
    with pytest.raises(ValueError, match="allow_fewer_refs"):
        loader.make_loader(built[0], kind="raw", batch_size=1, num_refs=2, seed=0)
    it = loader.make_loader(built[0], kind="raw", batch_size=1, num_refs=2, seed=0, allow_fewer_refs=True,
                            num_epochs=1, shuffle=False)
    for batch in it:
        own = examples[batch["index"][0]]["ref_index"].tolist()
        assert batch["ref_index"].shape == (1, 2) and set(batch["ref_index"][0]) == set(own)
        assert batch["ref_count"][0] == len(own)


# --- precompute ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders():
    """The tiny demo's VAE and T5 (configs/cog_vap_tiny.py) with random weights."""
    vcfg = cogvideox_vae.VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                   sample_height=64, sample_width=96)
    tcfg = t5.T5Config(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
    key = jax.random.PRNGKey(0)
    vparams = random_params(jax.eval_shape(partial(cogvideox_vae.init_params, vcfg), key), 1)
    tparams = random_params(jax.eval_shape(partial(t5.init_params, tcfg), key), 2)
    tokenizer = T5Tokenizer.from_folder(str(ROOT / "vapjax" / "assets" / "tiny_tokenizer"))
    enc = Encoders(vcfg, vparams, tcfg, tparams, tokenizer, max_length=32)
    return CogVideoXFeatures(enc), (vcfg, vparams, tcfg, tparams)


@pytest.fixture(scope="module")
def latents(built, encoders, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latents"))
    return precompute.precompute(built[0], out, encoders[0], batch_size=2, dtype="float32")


def test_precompute_matches_the_encoders(examples, encoders, latents):
    enc, (vcfg, vparams, tcfg, tparams) = encoders[0].encoders, encoders[1]
    source = latents.as_data_source(split="train")
    assert len(source) == len(examples)
    for e, raw in zip((source[i] for i in range(len(source))), examples):
        assert e["path"] == raw["path"] and e["ref_index"].tolist() == raw["ref_index"].tolist()
    vae = cogvideox_vae.AutoencoderKLCogVideoX(vcfg)
    for i in (0, len(examples) - 1):   # the first and the padded last batch
        clip = video.to_model_range(examples[i]["video"])[None]
        for key, frames in (("latent_dist", clip), ("image_dist", clip[:, :1])):
            post = vae.apply({"params": vparams}, frames, method="encode")
            want = np.concatenate([post.mean, post.logvar], -1)[0]
            np.testing.assert_allclose(source[i][key], want, atol=1e-5, rtol=1e-5)
        ids = enc.tokenizer([examples[i]["caption"].decode()], 32)
        want = t5.T5Encoder(tcfg).apply({"params": tparams}, ids)[0]
        np.testing.assert_allclose(source[i]["text"], want, atol=1e-5, rtol=1e-5)
    assert source[0]["latent_dist"].shape == (3, 8, 12, 32) and source[0]["image_dist"].shape == (1, 8, 12, 32)
    empty = t5.T5Encoder(tcfg).apply({"params": tparams}, enc.tokenizer([""], 32))[0]
    np.testing.assert_allclose(loader.empty_text(latents.data_dir), empty, atol=1e-5, rtol=1e-5)


def test_latent_batches_and_caption_dropout(latents):
    source = latents.as_data_source(split="train")
    batch = next(loader.make_loader(latents.data_dir, batch_size=2, seed=0))
    shapes = {k: v.shape for k, v in batch.items()}
    assert shapes["latent_dist"] == (2, 3, 8, 12, 32) and shapes["image_dist"] == (2, 1, 8, 12, 32)
    assert shapes["text"] == (2, 32, 32) and shapes["ref_text"] == (2, 1, 32, 32)
    assert shapes["ref_latent_dist"] == (2, 1, 3, 8, 12, 32) and shapes["ref_image_dist"] == (2, 1, 1, 8, 12, 32)
    for b in range(2):
        ref = source[batch["ref_index"][b, 0]]
        np.testing.assert_array_equal(batch["ref_text"][b, 0], ref["text"])
        np.testing.assert_array_equal(batch["ref_latent_dist"][b, 0], ref["latent_dist"])
    dropped = next(loader.make_loader(latents.data_dir, batch_size=2, seed=0, caption_dropout=1.0))
    empty = loader.empty_text(latents.data_dir)
    assert (dropped["text"] == empty).all() and (dropped["ref_text"] == empty).all()
    np.testing.assert_array_equal(dropped["latent_dist"], batch["latent_dist"])


def test_bfloat16_storage(built, encoders, tmp_path_factory, latents):
    stored = precompute.precompute(built[0], str(tmp_path_factory.mktemp("bf16")), encoders[0], batch_size=2)
    batch = next(loader.make_loader(stored.data_dir, batch_size=2, seed=0, caption_dropout=1.0))
    assert batch["latent_dist"].dtype == batch["text"].dtype == jax.numpy.bfloat16
    full = latents.as_data_source(split="train")[batch["index"][0]]["latent_dist"]
    np.testing.assert_allclose(batch["latent_dist"][0].astype(np.float32), full, rtol=1e-2, atol=1e-2)
