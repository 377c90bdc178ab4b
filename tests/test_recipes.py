"""The other official training recipes: LoRA training (any recipe), multi-reference SFT (spec §7.7) and
Diffusion-DPO (spec §7.8) — against a PyTorch rendering where there is math, and as tiny runs that learn.
"""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXDDIMScheduler
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import get_resize_crop_region_for_grid

from configs import cog_vap_dpo, cog_vap_dpo_tiny, cog_vap_train_3ref
from conftest import rel_err
from convert.cogvideox import convert_transformer
from convert.lora import module_names
from test_cogvideox import stock_model
from test_training import SCHEDULER, tiny_config
from vapjax import lora, training
from vapjax import tree as vtree
from vapjax.data import loader, precompute, synthetic, vap_data
from vapjax.data.dpo_pairs import DPOPairs, PairSampler
from vapjax.data.features import load_features
from vapjax.data.random_latents import RandomDPOPairs, RandomLatents
from vapjax.data.ref_dropout import RefDropout
from vapjax.models import cogvideox
from vapjax.sampling import DDIMSchedule

ATTN = r"blocks/attn/(to_q|to_k|to_v|to_out)/kernel"


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------

def test_dpo_loss_and_lora_grads_match_torch(tmp_path):
    """§7.8 in PyTorch on stock diffusers CogVideoX: LoRA (W + α/r·B·A) on attention q/k/v/out as the
    policy, the same model without it as the reference (no_grad), the §7.3 per-sample losses of 2 pairs
    on one x_t per sample, loss = mean over pairs of −log σ(−250·[(ℓ_w−ℓ_l) − (ℓ^ref_w−ℓ^ref_l)])·w.
    Ours: `lora.apply` + `cogvideox_sample_losses` + `dpo_loss`. fp32: loss within 1e-5 and every LoRA
    factor's gradient within 1e-4 relative (a sign, β/2, pairing or stop-gradient mistake is O(1)). β = 5
    here: the official 500 multiplies the fp32 noise of ℓ_w − ℓ_l (~1e-6 relative) by 250 and saturates
    the sigmoid of a random model; `test_dpo_loss_at_the_official_beta` checks β = 500 on given losses."""
    model = stock_model(tmp_path, use_rotary_positional_embeddings=True)
    cfg, params = convert_transformer(str(tmp_path))
    rank, alpha, beta = 4, 8.0, 5.0
    factors = lora.init(params, ATTN, rank, jax.random.key(0))
    factors = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), factors)
    names = module_names("cogvideox_transformer", cfg)
    sched = CogVideoXDDIMScheduler.from_config(SCHEDULER)
    rng = np.random.default_rng(0)
    b, f, c, h, w = 4, 2, 4, 8, 12                 # 2 pairs: [win0, lose0, win1, lose1]
    x0, image, noise = (rng.standard_normal((b, f, c, h, w)).astype(np.float32) for _ in range(3))
    text = rng.standard_normal((b, 7, 24)).astype(np.float32)
    t = np.array([613, 613, 88, 88])               # one t per pair
    pair_weight = np.array([0.7, 1.9], np.float32)

    # PyTorch: the LoRA factors as leaves; the LoRA'd weights through functional_call.
    tt = torch.from_numpy
    flat = vtree.flatten(factors)
    leaves = {}
    for name, (path, slot) in names.items():
        down = path[:-1] + ("lora_down",)
        if down in flat:
            leaves[name] = (tt(np.array(flat[down][slot]).T.copy()).requires_grad_(),        # A [r, in]
                            tt(np.array(flat[path[:-1] + ("lora_up",)][slot]).T.copy()).requires_grad_())  # B
    base = dict(model.named_parameters())
    rope = get_3d_rotary_pos_embed(16, get_resize_crop_region_for_grid((4, 6), 6, 4), (4, 6), f)
    x_t = sched.add_noise(tt(x0), tt(noise), tt(t))
    ab = sched.alphas_cumprod[tt(t)].float()

    def sample_losses(weights):
        v = torch.func.functional_call(model, weights, (torch.cat([x_t, tt(image)], 2), tt(text), tt(t)),
                                       {"image_rotary_emb": rope, "return_dict": False})[0]
        x0_hat = sched.get_velocity(v, x_t, tt(t))
        return ((1 / (1 - ab)).reshape(-1, 1, 1, 1, 1) * (x0_hat - tt(x0)) ** 2).reshape(b, -1).mean(1)

    policy = sample_losses({**base, **{f"{n}.weight": base[f"{n}.weight"] + alpha / rank * B @ A
                                       for n, (A, B) in leaves.items()}})
    with torch.no_grad():
        reference = sample_losses(base)
    lw, ll = policy.reshape(2, 2).unbind(1)
    rw, rl = reference.reshape(2, 2).unbind(1)
    inside = -0.5 * beta * ((lw - ll) - (rw - rl))
    loss_t = (-F.logsigmoid(inside) * tt(pair_weight)).mean()
    loss_t.backward()

    cl = lambda a: jnp.asarray(a).transpose(0, 1, 3, 4, 2)
    alphas = DDIMSchedule.from_config(SCHEDULER).alphas_cumprod

    def loss_fn(fac):
        def losses(p):
            predict = lambda x, t_: cogvideox.CogVideoXTransformer(cfg).apply(
                {"params": p}, jnp.concatenate([x, cl(image)], -1), jnp.asarray(text), t_)
            return training.cogvideox_sample_losses(predict, cl(x0), cl(noise), jnp.asarray(t), alphas)
        return training.dpo_loss(losses(lora.apply(params, fac, alpha)), losses(params), jnp.asarray(pair_weight), beta)

    (loss, margin), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(factors)
    err = abs(float(loss) - loss_t.item()) / loss_t.item()
    assert abs(float(margin) - inside.mean().item()) <= 1e-4 * abs(inside).mean().item()
    g = vtree.flatten(grads)
    worst = 0.0
    for name, (A, B) in leaves.items():
        path, slot = names[name]
        worst = max(worst, rel_err(np.asarray(g[path[:-1] + ("lora_down",)][slot]), A.grad.numpy().T),
                    rel_err(np.asarray(g[path[:-1] + ("lora_up",)][slot]), B.grad.numpy().T))
    print(f"DPO: loss {loss_t.item():.4f} (margins {inside.detach().numpy()}), loss rel. error {err:.1e}, "
          f"worst LoRA gradient {worst:.1e} over {2 * len(leaves)} factors")
    assert abs(inside).min() > 0.05 and err < 1e-5 and worst < 1e-4


def test_dpo_loss_at_the_official_beta():
    rng = np.random.default_rng(0)
    pol, ref = rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.uniform(0.5, 1.5, 6).astype(np.float32)
    pol[1::2] = pol[0::2] + rng.uniform(-0.01, 0.01, 3).astype(np.float32)   # |margin| ~ O(1) at β = 500
    ref[1::2] = ref[0::2] + rng.uniform(-0.01, 0.01, 3).astype(np.float32)
    w = np.array([0.5, 1.0, 2.0], np.float32)
    tp, tr = torch.from_numpy(pol.astype(np.float64)).reshape(3, 2), torch.from_numpy(ref.astype(np.float64)).reshape(3, 2)
    inside = -0.5 * 500 * ((tp[:, 0] - tp[:, 1]) - (tr[:, 0] - tr[:, 1]))            # TR:810-815
    want = (-F.logsigmoid(inside) * torch.from_numpy(w.astype(np.float64))).mean().item()
    loss, margin = training.dpo_loss(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(w), cog_vap_dpo.get_config().dpo.beta)
    assert abs(float(loss) - want) <= 1e-4 * want and abs(float(margin) - inside.mean().item()) < 1e-3  # fp32 input rounding


def test_dpo_inputs_pair_layout():
    """One pair → [win, lose]: the same reference draw and caption dropout, their own targets."""
    data = RandomDPOPairs(size=6, batch_size=3, frames=2, height=4, width=6, channels=4, text_len=5, text_dim=8)
    batch = next(data)
    assert batch["latent_dist"].shape == (3, 2, 2, 4, 6, 8) and batch["ref_latent_dist"].shape == (3, 1, 2, 4, 6, 8)
    assert all(len({*wl, *r}) == 3 for wl, r in zip(batch["index"], batch["ref_index"]))  # distinct clips
    for drop in (0.0, 1.0):
        x = jax.jit(training.cogvideox_dpo_inputs, static_argnums=(2, 4, 5))(
            batch, jax.random.key(0), 0.7, jnp.asarray(data.empty_text), drop, jnp.float32)
        assert x["x0"].shape == (6, 2, 4, 6, 4)
        np.testing.assert_array_equal(x["ref_latents"][0::2], x["ref_latents"][1::2])
        np.testing.assert_array_equal(x["ref_text"][0::2], x["ref_text"][1::2])
        assert not np.allclose(x["x0"][0], x["x0"][1])
        blank = np.all(np.asarray(x["text"]) == data.empty_text, axis=(1, 2))
        assert blank.tolist() == [bool(drop)] * 6


def test_tiny_dpo_raises_the_reward_margin(tmp_path):
    """60 steps of cog_vap_dpo_tiny: the implicit reward margin rises from ~0 (policy ≈ reference at B = 0);
    only LoRA factors train (optimizer state for them alone); the base weights are untouched; the exported
    file puts the LoRA back. Measured: margin 0.01 → 0.71 (mean of the first / last 10 steps)."""
    from train import load_model, train  # noqa: PLC0415
    c = cog_vap_dpo_tiny.get_config()
    c.workdir, c.progress, c.tensorboard = str(tmp_path), False, False
    _, initial = load_model(c)
    history, state, frozen = train(c)
    margin = np.array([m["reward_margin"] for m in history])
    print(f"tiny DPO: reward margin {margin[:10].mean():.3f} -> {margin[-10:].mean():.3f}")
    # Step 0: the policy is the reference up to float32 rounding (the LoRA layer sums x·W in its own fusion), ×β/2.
    assert abs(margin[0]) < 1e-3 and margin[-10:].mean() > 0.3 and margin[-10:].mean() > 10 * abs(margin[:10].mean())
    jax.tree.map(np.testing.assert_array_equal, frozen, initial)
    paths = set(vtree.flatten(state.params))
    assert {p[0] for p in paths} == {"backbone", "expert"} and all(p[-1] in ("lora_down", "lora_up") for p in paths)
    assert {p[-2] for p in paths} == {"to_q", "to_k", "to_v", "to_out"}
    leaves = [a for a in jax.tree.leaves(state.opt_state) if np.ndim(a) > 0]
    assert sum(a.nbytes for a in leaves) == 2 * sum(a.nbytes for a in jax.tree.leaves(state.params))
    cfg, _ = load_model(c)
    back = lora.load_into(initial, [(str(tmp_path / "lora.safetensors"), 1.0)], module_names("cogvideox_transformer", cfg))
    want = lora.apply(initial, state.params, c.lora.alpha)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), back, want)  # float32 rounding


def test_official_dpo_and_3ref_hyperparameters():
    c = cog_vap_dpo.get_config()
    assert (c.recipe, c.lora.rank, c.lora.alpha, c.dpo.beta, c.optimizer.learning_rate, c.caption_dropout) == \
        ("dpo", 32, 32.0, 500.0, 5e-5, 0.02)
    assert training.learning_rate(c.optimizer)(0) == np.float32(5e-5)        # "constant": no warmup
    c = cog_vap_train_3ref.get_config()
    assert (c.data.num_refs, c.data.mask_ref_ratio, c.caption_dropout, c.optimizer.learning_rate,
            c.optimizer.warmup_steps) == (3, 0.3, 0.1, 1e-5, 1000)


# ---------------------------------------------------------------------------------------------
# Multi-reference SFT
# ---------------------------------------------------------------------------------------------

def test_ref_dropout_distribution_and_resume():
    make = lambda: RefDropout(RandomLatents(size=8, batch_size=2, frames=2, height=2, width=2, channels=4, text_len=3,
                                            text_dim=4, num_refs=3), num_refs=3, mask_ref_ratio=0.3, seed=5)
    it = make()
    counts = np.bincount([it.draw(s) for s in range(4000)], minlength=4)[1:] / 4000
    np.testing.assert_allclose(counts, [0.09, 0.42, 0.49], atol=0.03)  # 1 + Binomial(2, 0.7); 0.3 would be another law
    full = RandomLatents(size=8, batch_size=2, frames=2, height=2, width=2, channels=4, text_len=3, text_dim=4, num_refs=3)
    for _ in range(5):
        b, ref = next(it), next(full)
        n = b["ref_text"].shape[1]
        np.testing.assert_array_equal(b["ref_index"], ref["ref_index"][:, :n])     # the first n of the sample
        np.testing.assert_array_equal(b["ref_latent_dist"], ref["ref_latent_dist"][:, :n])
        np.testing.assert_array_equal(b["latent_dist"], ref["latent_dist"])
    again = make()
    again.set_state(it.get_state())
    a, b = next(again), next(it)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_batched_references_equal_per_sample_runs():
    """A batch whose samples share N gives each sample the loss it gets alone (so bucketing the batch by N
    changes nothing per sample); N changes the computation (RoPE over N references), so padding would not."""
    from train import load_model  # noqa: PLC0415
    c = tiny_config("/tmp/unused")
    cfg, params = load_model(c)
    data = RandomLatents(size=8, batch_size=3, frames=cfg.latent_frames, height=cfg.sample_height, width=cfg.sample_width,
                         channels=cfg.out_channels, text_len=cfg.max_text_seq_length, text_dim=cfg.text_embed_dim,
                         num_refs=3)
    batch = {k: jnp.asarray(v) for k, v in next(data).items()}
    alphas = DDIMSchedule.from_config(c.scheduler.to_dict()).alphas_cumprod
    model = cogvideox.CogVideoXTransformer(cfg)
    x = training.cogvideox_inputs(batch, jax.random.key(0), 0.7, jnp.asarray(data.empty_text), 0.0, jnp.float32)
    noise, t = jax.random.normal(jax.random.key(1), x["x0"].shape), jnp.array([5, 400, 999])

    def losses(n, rows):
        sub = {k: v[rows] for k, v in x.items()}
        f = cfg.latent_frames
        sub["ref_latents"], sub["ref_text"] = sub["ref_latents"][:, :n * f], sub["ref_text"][:, :n * cfg.max_text_seq_length]
        return training.cogvideox_sample_losses(training.cogvideox_predictor(model, params, sub), sub["x0"],
                                                noise[rows], t[rows], alphas)

    for n in (1, 2, 3):
        together = losses(n, slice(None))
        alone = jnp.concatenate([losses(n, slice(i, i + 1)) for i in range(3)])
        np.testing.assert_allclose(together, alone, rtol=1e-5)  # batch-size-dependent reduction order only
    assert not np.allclose(losses(1, slice(None)), losses(2, slice(None)), rtol=1e-2)


def test_tiny_3ref_training_lowers_the_loss(tmp_path):
    """The 3-reference recipe on the tiny model: N varies per step (all of 1, 2, 3 occur) and the loss falls."""
    from train import train  # noqa: PLC0415
    c = tiny_config(tmp_path, steps=80)
    c.data.update(dict(num_refs=3, mask_ref_ratio=0.3))
    c.caption_dropout = 0.1
    history, _, _ = train(c)
    losses = np.array([m["loss"] for m in history])
    ns = {RefDropout(None, num_refs=3, mask_ref_ratio=0.3, seed=c.data.seed).draw(s) for s in range(c.steps)}
    print(f"tiny 3-ref: loss {losses[:10].mean():.3f} -> {losses[-10:].mean():.3f}; N drawn {sorted(ns)}")
    assert ns == {1, 2, 3} and losses[-10:].mean() < 0.8 * losses[:10].mean()


# ---------------------------------------------------------------------------------------------
# LoRA on an SFT recipe
# ---------------------------------------------------------------------------------------------

def test_lora_sft_trains_only_the_factors(tmp_path):
    from train import load_model, train  # noqa: PLC0415
    c = tiny_config(tmp_path, steps=60)
    # B starts at 0 and the base model is random: a larger step than the full-expert recipe's (at lr 3e-3,
    # α/r 2 the loss went 1.79 -> 1.66 in 60 steps).
    c.optimizer.learning_rate = 1e-2
    c.lora.update(dict(rank=4, alpha=16.0, targets=r"expert/blocks/(attn|ff)/.*"))
    _, initial = load_model(c)
    history, state, frozen = train(c)
    losses = np.array([m["loss"] for m in history])
    print(f"tiny LoRA SFT: loss {losses[:10].mean():.3f} -> {losses[-10:].mean():.3f}")
    assert losses[-10:].mean() < 0.8 * losses[:10].mean()
    jax.tree.map(np.testing.assert_array_equal, frozen, initial)
    assert {p[:2] for p in vtree.flatten(state.params)} == {("expert", "blocks")}
    leaves = [a for a in jax.tree.leaves(state.opt_state) if np.ndim(a) > 0]
    assert sum(a.nbytes for a in leaves) == 2 * sum(a.nbytes for a in jax.tree.leaves(state.params))
    assert (tmp_path / "lora.safetensors").exists()


@pytest.mark.parametrize("overrides,message", [
    (dict(recipe="dpo"), "recipe 'dpo' trains LoRA factors"),
    (dict(recipe="ppo"), "unknown recipe 'ppo'"),
    (dict(**{"lora.rank": 4}), "needs lora.targets"),
    (dict(**{"lora.rank": 4, "lora.targets": "nothing_like_this"}), "matches no Linear kernel"),
    (dict(**{"lora.rank": 4, "lora.targets": "attn", "unfreeze": "head"}), "unfreeze='head' has no effect"),
    (dict(**{"data.mask_ref_ratio": 0.3}), "mask_ref_ratio=0.3 has no effect"),
])
def test_recipe_settings_are_one_line_errors(tmp_path, overrides, message):
    from train import setup, make_data  # noqa: PLC0415
    c = tiny_config(tmp_path, **overrides)
    with pytest.raises(ValueError if "Linear" in message else Exception, match=message) as e:
        cfg, *_ = setup(c)
        make_data(c, cfg)
    assert "\n" not in str(e.value)


def test_dpo_pair_sampler_follows_the_official_rule():
    scores = {"a": 95, "b": 100, "c": 85, "d": 5, "e": 25, "f": 0, "g": 100, "x": 92, "y": 3}
    kinds = {p: "k" for p in scores} | {"x": "other", "y": "other"}
    s = PairSampler(scores, kinds)
    assert "f" not in s.scores                                      # score 0 fails the official "> 0"
    # 10-point bins over all 8 scored videos: 90s {a, x}, 100 {b, g}, 80s {c}, 0s {d, y}, 20s {e}.
    assert s.prob["a"] == 2 / 8 and s.prob["b"] == 2 / 8 and s.prob["c"] == 1 / 8 and s.prob["e"] == 1 / 8
    assert s.weight("a", "d") == pytest.approx(90 * 0.02 / np.sqrt(2 / 8 * 2 / 8))
    assert s.stage(0) == s.stage(1) == (90, 10) and s.stage(2) == s.stage(50) == (80, 30)
    rng = random.Random(0)
    early = [s.sample("k", 0, rng) for _ in range(200)]
    assert {p.win for p in early} == {"a", "b", "g"} and {p.lose for p in early} == {"d"}
    assert all(p.ref in ("b", "g") and p.ref != p.win for p in early)   # score 100 first, never win/lose
    late = [s.sample("k", 2, rng) for _ in range(200)]
    assert {p.win for p in late} == {"a", "b", "g", "c"} and {p.lose for p in late} == {"d", "e"}
    assert s.sample("other", 0, rng) is None                           # no reference of score > 80 besides win

    paths = list(scores)
    source = [{"text": np.full((2, 3), i, np.float32)} for i in range(len(paths))]
    make = lambda: DPOPairs(source, paths, scores, kinds, ["text"], batch_size=3, seed=1, process_index=0,
                            process_count=1)
    it = make()
    batch = next(it)
    assert batch["text"].shape == (3, 2, 2, 3) and batch["ref_text"].shape == (3, 1, 2, 3)
    for b in range(3):
        win, lose = (paths[i] for i in batch["index"][b])
        assert batch["pair_weight"][b] == np.float32(s.weight(win, lose))
        np.testing.assert_array_equal(batch["text"][b, 0], source[batch["index"][b, 0]]["text"])
    for _ in range(3):   # past the batches read ahead
        next(it)
    again = make()
    again.set_state(it.get_state())
    jax.tree.map(np.testing.assert_array_equal, next(again), next(it))


class _CountingSource(list):
    """A random-access source that counts its reads."""
    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def test_dpo_pairs_read_names_not_records_and_draw_every_split():
    """Constructing DPOPairs reads no record (the names come from the dataset's index), batches are read
    ahead, and the candidates are the clips of every split while only train-split clips are rows (DS:904-926:
    the official pools come from the whole filtered CSV, its rows from the train split)."""
    scores = {"w": 95, "l": 5, "r": 100, "t_win": 98, "t_lose": 2}
    kinds = {p: "k" for p in scores}
    paths = list(scores)
    splits = ["train", "train", "train", "test", "test"]
    source = _CountingSource({"text": np.full((1,), i, np.float32)} for i in range(len(paths)))
    it = DPOPairs(source, paths, scores, kinds, ["text"], splits=splits, batch_size=1, seed=0, process_index=0,
                  process_count=1, prefetch=2)
    assert source.reads == 0
    batches = [next(it) for _ in range(60)]
    drawn = {paths[i] for b in batches for i in b["index"].ravel()}
    assert {"t_win", "t_lose"} <= drawn                      # test-split clips are candidates
    assert len(it.rows) == 3                                 # ... but not rows
    assert len(it._pending) == 2                             # two batches in flight
    it.close()


# ---------------------------------------------------------------------------------------------
# The recipes on the real data path: VAP-Data CSV -> vap_data -> precompute -> train.py
# ---------------------------------------------------------------------------------------------

# One effect: win candidates (score >= 90), lose candidates (<= 10, one of them in the test split) and a
# score-100 reference. With the train split alone w has 2 references and l and r 1 each: fewer than 3.
RECIPE_CLIPS = (
    synthetic.Clip("w", "balloon", "ok", score=95, refs=("l", "r", "t")),
    synthetic.Clip("l", "balloon", "ok", score=5, refs=("w",)),
    synthetic.Clip("r", "balloon", "ok", score=100, refs=("w",)),
    synthetic.Clip("t", "balloon", "split", score=3, split="test", refs=("w",)),
)


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
    """(VAP-Data folder, converted official tiny CogVideoX pipeline, its features, precompute): the
    folder of RECIPE_CLIPS and the pipeline whose VAE and T5 encode it."""
    from conftest import golden_dir  # noqa: PLC0415
    from convert.pipeline import convert_pipeline  # noqa: PLC0415
    root = tmp_path_factory.mktemp("recipes")
    raw = synthetic.write(str(root / "raw"), RECIPE_CLIPS)
    convert_pipeline(str(golden_dir() / "cog_pipeline_tiny"), str(root / "pipe"))
    features = load_features(str(root / "pipe"), text_length=96)   # the tiny model's caption length

    def latents(config: str) -> str:
        data = vap_data.build(raw, str(root / config), config, workers=2)
        return precompute.precompute(data, str(root / f"{config}_latents"), features, dtype="float32").data_dir
    return root, latents


def _real_data_config(workdir, base, pipe, data_dir, **data):
    c = base.get_config()
    c.workdir, c.progress, c.tensorboard = str(workdir), False, False
    c.random_init, c.init_checkpoint = False, str(pipe / "transformer")
    c.model = ml_collections.ConfigDict()   # the checkpoint's architecture
    c.model_options.update(dict(dtype="float32", param_dtype="float32", remat="none"))
    c.data.update(dict(kind="latents", dir=data_dir, worker_count=0, **data))
    c.update(dict(steps=1, batch_size=2, checkpoint_every=100, async_checkpoint=False, log_every=1))
    return c


def test_dpo_trains_on_the_real_data_path(recipe_data, tmp_path):
    """DPO from a VAP-Data CSV through vap_data (every split) and precompute: the kinds reach the sampler
    (they were lost: KeyError 'kind'), the test-split lose clip is a candidate, and training runs."""
    from train import make_data, train  # noqa: PLC0415
    root, latents = recipe_data
    data_dir = latents("tiny_all")
    index = loader.example_index(data_dir)
    assert index == {"path": [c.path for c in RECIPE_CLIPS], "kind": ["balloon"] * 4,
                     "split": ["train"] * 3 + ["test"]}
    c = _real_data_config(tmp_path, cog_vap_dpo_tiny, root / "pipe", data_dir, scores_csv=str(root / "raw" / "vap_data.csv"))
    it, _ = make_data(c, None)
    pairs = [next(it) for _ in range(6)]
    drawn = {index["path"][i] for b in pairs for i in b["index"][:, 1]}
    assert drawn == {"videos/l.mp4", "videos/t.mp4"}                      # both lose candidates, any split
    for b in pairs:   # the score-100 reference, or the 95 one when r itself wins
        for (win, _), (ref,) in zip(b["index"], b["ref_index"]):
            assert ref != win and index["path"][ref] in ("videos/r.mp4", "videos/w.mp4")
    history, state, _ = train(c)
    assert len(history) == 1 and np.all(np.isfinite([m["loss"] for m in history]))
    assert (tmp_path / "lora.safetensors").exists()
    with pytest.raises(ValueError, match="built with every split"):   # SFT would train on test clips
        loader.make_loader(data_dir, batch_size=2, seed=0)


class _CtrlCAfterFirstStep:
    """train.py's SIGINT handler as if Ctrl-C came as the first step ended."""
    requested = False

    @property
    def graceful(self):
        return self.requested

    @graceful.setter
    def graceful(self, value):
        self.requested = value


def test_3ref_sft_trains_on_the_real_data_path(recipe_data, tmp_path):
    """The 3-reference recipe on a dataset whose clips have 1 or 2 references: it starts, and a step
    never repeats a reference (N is capped by the fewest references in the batch). The run is stopped by
    a Ctrl-C after its first step: it ends after that step, with a checkpoint of it."""
    from train import Interrupted, make_data, train  # noqa: PLC0415
    root, latents = recipe_data
    data_dir = latents("tiny")
    recipe = cog_vap_train_3ref.get_config().data
    refs = {k: recipe[k] for k in ("num_refs", "mask_ref_ratio", "allow_fewer_refs")}
    c = _real_data_config(tmp_path, cog_vap_train_3ref, root / "pipe", data_dir, **refs)
    c.update(dict(batch_size=1, optimizer=cog_vap_train_3ref.get_config().optimizer))
    it, _ = make_data(c, None)
    counts = loader.open_builder(data_dir).as_data_source(split="train")
    ns = set()
    for _ in range(12):
        b = next(it)
        n = b["ref_index"].shape[1]
        ns.add(n)
        assert n <= len(counts[int(b["index"][0])]["ref_index"]) and len(set(b["ref_index"][0])) == n
    assert ns == {1, 2}
    c.steps = 3
    with pytest.raises(Interrupted, match="after step 1"):
        train(c, _CtrlCAfterFirstStep())
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in rows] == [0] and np.isfinite(rows[0]["loss"])
    assert sorted(d.name for d in (tmp_path / "checkpoints").iterdir()) == ["1"]


# ---------------------------------------------------------------------------------------------
# Validation during training
# ---------------------------------------------------------------------------------------------

def test_validation_writes_samples_and_tensorboard_videos(tmp_path, monkeypatch):
    """Two steps of the tiny sample model's transformer with validation every 2 steps: the case of the
    official-layout file is sampled with the run's weights into samples/step_2/<case>.mp4 and TensorBoard.
    The weights keep the training shardings (no copy of the transformer on one device) and the pipeline
    runs on the training mesh; a run of several processes validates on every one (process 0 writes)."""
    import json as _json  # noqa: PLC0415

    from jax.sharding import NamedSharding  # noqa: PLC0415

    import train as train_module  # noqa: PLC0415
    from configs import cog_vap_tiny  # noqa: PLC0415
    from train import train  # noqa: PLC0415
    from vapjax import validation, video  # noqa: PLC0415
    seen = {}
    call = validation.Validator.__call__

    def spy(self, step, params):
        seen.update(shardings={a.sharding for a in jax.tree.leaves(params)}, mesh=self.pipe.placement.mesh)
        return call(self, step, params)
    monkeypatch.setattr(validation.Validator, "__call__", spy)
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        video.write_video(root / f"{name}.mp4", rng.integers(0, 255, (9, 64, 96, 3), dtype=np.uint8), fps=16)
    (root / "val.csv").write_text(
        "video_paths,ref_video_paths,tar_video_caption,kind,split,reference_alignment_score\n"
        'a.mp4,"[""b.mp4""]",a ball inflates,k,val,90\n'
        'b.mp4,"[""a.mp4""]",a cup inflates,k,val,80\n')
    (root / "validation.json").write_text(_json.dumps(dict(root=str(root), val_data=["val.csv"], sample_ref_videos_num=1,
                                                           num_frames=9, height=64, width=96, num_inference_steps=50)))
    sample = cog_vap_tiny.get_config()
    c = tiny_config(tmp_path / "run", steps=2)
    c.model = sample.model.transformer
    c.tensorboard = True
    c.validation.update(dict(every=2, file=str(root / "validation.json"), max_samples=1, steps=2))
    c.validation.model = sample.model
    c.validation.request.max_sequence_length = sample.max_sequence_length   # the tiny model's caption length
    train(c)
    out = tmp_path / "run" / "samples" / "step_2" / "a.mp4"
    frames, fps = video.read_video(out)
    assert frames.shape == (9, 64, 96, 3) and fps == 16 and not (tmp_path / "run" / "samples" / "step_2" / "b.mp4").exists()
    events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tb").iterdir())
    assert b"validation/a" in events
    assert seen["mesh"] is not None and all(isinstance(s, NamedSharding) and s.mesh == seen["mesh"]
                                            for s in seen["shardings"]), seen
    # Process 1 of 2: validates too (it must take part in the sharded loop), and writes nothing.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    other = train_module.make_validator(c, train_module.load_model(c)[0], None, seen["mesh"])
    assert other is not None and not other.write and other.pipe.placement.mesh == seen["mesh"]
