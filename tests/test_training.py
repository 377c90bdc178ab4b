"""Training: the objective against PyTorch, the frozen backbone, convergence, SPMD equivalence
(8 simulated devices, 2 processes), and kill/resume."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler

from conftest import ROOT, rel_err, with_xla_flags
from configs import cog_vap_train, cog_vap_train_tiny, wan_vap_train_tiny
from convert.cogvideox import convert_transformer, rules, target_shapes
from test_cogvideox import stock_model
from vapjax import training
from vapjax import tree as vtree
from vapjax.models import cogvideox
from vapjax.models.cogvideox_vae import Posterior
from vapjax.sampling import DDIMSchedule

SCHEDULER = cog_vap_train.COGVIDEOX_SCHEDULER


def official_ddim_timesteps() -> np.ndarray:
    """t per index as the official trainer computes it, in torch with the stock scheduler
    (UDIFF:86-121, CSPEC:602): σ = scheduler.timesteps.float() / 1000, t = (σ · 1000).long()."""
    sched = CogVideoXDDIMScheduler.from_config(SCHEDULER)
    return ((sched.timesteps.clone().float() / float(sched.config.num_train_timesteps)) * 1000.0).long().numpy()


def official_flow_tables() -> tuple[np.ndarray, np.ndarray]:
    """(σ, t) per index as the official Wan trainer computes them: FlowMatchEulerDiscreteScheduler().sigmas
    and (σ · 1000).long() (UDIFF:107-117, WSPEC)."""
    sigma = FlowMatchEulerDiscreteScheduler().sigmas.clone()
    return sigma.numpy(), (sigma * 1000.0).long().numpy()


def test_timestep_draw_is_the_official_set():
    """Our drawn t over many draws is exactly the official set: 0..999 without 511, 506, 502, 253 and 251
    (float32 round trip, spec §7.3, §8.15) — computed on device this gives all of 0..999."""
    official = official_ddim_timesteps()
    np.testing.assert_array_equal(training.ddim_timestep_table(), official)
    t = np.asarray(jax.jit(training.cogvideox_timesteps, static_argnums=1)(jax.random.PRNGKey(0), 100_000))
    assert set(t.tolist()) == set(official.tolist())
    assert sorted(set(range(1000)) - set(t.tolist())) == [251, 253, 502, 506, 511]
    counts = np.bincount(t, minlength=1000)
    assert counts[510] > 1.5 * np.median(counts)  # 510 is drawn for idx 488 and 489


def test_flow_draw_is_the_official_table():
    """Wan's (σ, t): every draw is an official (σ, t) pair, bit for bit (σ = 1 -> t = 1000, σ = 0.511 ->
    510), and over many draws the t in the well-sampled middle are exactly the official ones there."""
    sigma_table, t_table = official_flow_tables()
    ours = training.flow_tables()
    np.testing.assert_array_equal(ours[0], sigma_table)
    np.testing.assert_array_equal(ours[1], t_table)
    assert t_table[0] == 1000 and t_table[489] == 510
    sigma, t = jax.jit(training.flow_sigmas, static_argnums=1)(jax.random.PRNGKey(0), 200_000)
    sigma, t = np.asarray(sigma), np.asarray(t)
    idx = np.round((1 - sigma.astype(np.float64)) * 1000).astype(int)
    np.testing.assert_array_equal(sigma, sigma_table[idx])
    np.testing.assert_array_equal(t, t_table[idx])
    middle = (t_table >= 200) & (t_table <= 800)        # each index drawn ≳ 150 times at 200k draws
    assert set(t[(t >= 200) & (t <= 800)].tolist()) == set(t_table[middle].tolist())
    assert 510 in t and 511 not in t_table
    assert abs(np.median(sigma) - 0.5) < 0.01  # logit-normal around 1/2


def test_cogvideox_objective_matches_torch(tmp_path):
    """Loss and every parameter gradient of the official objective (spec §7.3), computed in PyTorch on
    stock diffusers CogVideoX with the diffusers scheduler, against ours — fp32, fixed t and noise."""
    model = stock_model(tmp_path, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    cfg, params = convert_transformer(str(tmp_path))
    sched = CogVideoXDDIMScheduler.from_config(SCHEDULER)
    rng = np.random.default_rng(0)
    b, f, c, h, w = 2, 3, 4, 8, 12
    x0 = rng.standard_normal((b, f, c, h, w)).astype(np.float32)
    image = rng.standard_normal((b, f, c, h, w)).astype(np.float32)
    noise = rng.standard_normal((b, f, c, h, w)).astype(np.float32)
    text = rng.standard_normal((b, 7, 24)).astype(np.float32)
    t = np.array([999, 137])

    # PyTorch, as finetrainers computes it.
    tt = torch.from_numpy
    x_t = sched.add_noise(tt(x0), tt(noise), tt(t))
    from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: PLC0415
    from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import get_resize_crop_region_for_grid  # noqa: PLC0415
    rope = get_3d_rotary_pos_embed(16, get_resize_crop_region_for_grid((4, 6), 6, 4), (4, 6), f)
    v = model(torch.cat([x_t, tt(image)], 2), tt(text), tt(t), image_rotary_emb=rope, return_dict=False)[0]
    x0_hat = sched.get_velocity(v, x_t, tt(t))
    ab = sched.alphas_cumprod[tt(t)].float()
    weights = (1 / (1 - ab)).reshape(-1, 1, 1, 1, 1)
    loss_t = (weights * (x0_hat - tt(x0)) ** 2).reshape(b, -1).mean(1).mean()
    loss_t.backward()

    # Ours (channels-last).
    cl = lambda a: jnp.asarray(a).transpose(0, 1, 3, 4, 2)
    alphas = DDIMSchedule.from_config(SCHEDULER).alphas_cumprod

    def loss_fn(p):
        predict = lambda x, tt_: cogvideox.CogVideoXTransformer(cfg).apply(
            {"params": p}, jnp.concatenate([x, cl(image)], -1), jnp.asarray(text), tt_)
        return training.cogvideox_loss(predict, cl(x0), cl(noise), jnp.asarray(t), alphas)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert abs(float(loss) - loss_t.item()) / loss_t.item() < 1e-5
    # Same loss as plain v-MSE (the identity behind the weighting).
    vel = np.sqrt(ab.numpy()).reshape(-1, 1, 1, 1, 1) * noise - np.sqrt(1 - ab.numpy()).reshape(-1, 1, 1, 1, 1) * x0
    assert abs(float(loss) - float(((v.detach().numpy() - vel) ** 2).mean())) / float(loss) < 1e-4

    flat = vtree.flatten(grads)
    torch_grads = dict(model.named_parameters())
    worst = 0.0
    for r in rules(cfg, target_shapes(cfg)):
        if r.src not in torch_grads:  # buffers (the position table) have no gradient in torch
            continue
        want = r.transform.apply(torch_grads[r.src].grad.numpy())
        got = np.asarray(flat[r.dst] if r.index is None else flat[r.dst][r.index])
        worst = max(worst, rel_err(got, want))
    print(f"objective: loss rel. error {abs(float(loss) - loss_t.item()) / loss_t.item():.1e}, worst gradient {worst:.1e}")
    assert worst < 1e-4


def test_flow_matching_loss():
    """Wan's objective on a linear 'model': x_t, target and weighting by hand; t is passed through."""
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float32)
    sigma, t = np.array([0.25, 0.9], np.float32), np.array([250, 900])
    seen = {}

    def predict(x_t, t):
        seen["t"] = t
        return 2.0 * x_t

    loss = training.flow_matching_loss(predict, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sigma),
                                       jnp.asarray(t))
    s = sigma.reshape(-1, 1, 1)
    want = np.mean((2 * ((1 - s) * x0 + s * noise) - (noise - x0)) ** 2)
    assert abs(float(loss) - want) < 1e-5 * want
    np.testing.assert_array_equal(seen["t"], t)


def _dist_batch(rng, b=6, n=2, f=3, h=4, w=6, c=4, s=5, d=8, logvar=-100.0):
    """A precomputed batch (mean ‖ logvar); logvar −100 is clipped to −30: draws equal the mean to ~3e-7."""
    dist = lambda *shape: np.concatenate([rng.standard_normal(shape + (c,)).astype(np.float32),
                                          np.full(shape + (c,), logvar, np.float32)], -1)
    return {"latent_dist": dist(b, f, h, w), "image_dist": dist(b, 1, h, w),
            "text": rng.standard_normal((b, s, d)).astype(np.float32),
            "ref_latent_dist": dist(b, n, f, h, w), "ref_image_dist": dist(b, n, 1, h, w),
            "ref_text": rng.standard_normal((b, n, s, d)).astype(np.float32)}


# One compilation for every call below (same shapes; scaling factor and dropout rate traced).
_inputs = jax.jit(training.cogvideox_inputs, static_argnums=5)


def test_cogvideox_inputs_layout():
    """x0 and every conditioning input from a precomputed batch: × scaling factor, first-frame conditions
    zero-padded to the clip, each reference's [latents | first frame] on channels, references on frames,
    reference captions on the sequence axis in the same order (spec §4.1, §4.3)."""
    rng = np.random.default_rng(0)
    batch = _dist_batch(rng)
    mean = {k: v[..., :4] for k, v in batch.items() if k.endswith("_dist")}
    x = _inputs(batch, jax.random.PRNGKey(1), 0.7, np.zeros((5, 8), np.float32), 0.0, jnp.float32)
    assert set(x) == {"x0", "image", "ref_latents", "text", "ref_text"}
    close = lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # posterior std 3e-7
    close(x["x0"], 0.7 * mean["latent_dist"])
    assert x["image"].shape == (6, 3, 4, 6, 4)
    close(x["image"][:, :1], 0.7 * mean["image_dist"])
    assert not np.any(np.asarray(x["image"][:, 1:]))                     # exact zeros, not tiny draws
    assert x["ref_latents"].shape == (6, 2 * 3, 4, 6, 8)
    for r in range(2):
        frames = x["ref_latents"][:, 3 * r:3 * (r + 1)]
        close(frames[..., :4], 0.7 * mean["ref_latent_dist"][:, r])
        close(frames[:, :1, ..., 4:], 0.7 * mean["ref_image_dist"][:, r])
        assert not np.any(np.asarray(frames[:, 1:, ..., 4:]))
        np.testing.assert_array_equal(x["ref_text"][:, 5 * r:5 * (r + 1)], batch["ref_text"][:, r])
    np.testing.assert_array_equal(x["text"], batch["text"])

    # Posterior draws (Posterior.from_concat): std exp(logvar / 2), logvar clipped to [−30, 20].
    batch = _dist_batch(rng, logvar=np.log(0.25))
    x0 = np.asarray(_inputs(batch, jax.random.PRNGKey(2), 1.0, np.zeros((5, 8), np.float32), 0.0, jnp.float32)["x0"])
    assert abs(np.std(x0 - batch["latent_dist"][..., :4]) - 0.5) < 0.04   # 1728 draws: ±0.01 (1 sd)
    p = Posterior.from_concat(jnp.concatenate([jnp.zeros(3), jnp.array([-99.0, 0.0, 99.0])]))
    np.testing.assert_array_equal(p.logvar, [-30.0, 0.0, 20.0])


def test_caption_dropout_blanks_a_sample_together():
    """Caption dropout replaces the target caption and every reference caption of the same sample by
    the empty-caption embedding together, and touches nothing else (spec §7.5)."""
    rng = np.random.default_rng(0)
    batch = _dist_batch(rng)
    empty = rng.standard_normal((5, 8)).astype(np.float32)
    x = _inputs(batch, jax.random.PRNGKey(3), 0.7, empty, 0.5, jnp.float32)
    text, ref_text = np.asarray(x["text"]), np.asarray(x["ref_text"]).reshape(6, 2, 5, 8)
    dropped = np.array([np.array_equal(text[i], empty) for i in range(6)])
    assert 0 < dropped.sum() < 6, dropped
    for i in range(6):
        for r in range(2):
            np.testing.assert_array_equal(ref_text[i, r], empty if dropped[i] else batch["ref_text"][i, r])
        if not dropped[i]:
            np.testing.assert_array_equal(text[i], batch["text"][i])
    kept = _inputs(batch, jax.random.PRNGKey(3), 0.7, empty, 0.0, jnp.float32)
    for k in ("x0", "image", "ref_latents"):   # the latents do not depend on the dropout
        np.testing.assert_array_equal(x[k], kept[k])
    assert not any(np.array_equal(t, empty) for t in np.asarray(kept["text"]))


_wan_inputs = jax.jit(training.wan_inputs, static_argnums=4)


def test_wan_inputs_layout_and_caption_dropout():
    """Wan's inputs from a batch: x0 and the reference drawn from the stored (normalised) posteriors, the
    conditions behind the I2V mask ([mask | condition], the expert's [reference | mask | condition]), CLIP
    embeddings as stored; caption dropout blanks a sample's target and reference captions together
    (spec §4.3, §7.5). More than one reference is a one-line error (the official model asserts one)."""
    rng = np.random.default_rng(0)
    b, f, h, w, ch = 6, 3, 4, 6, 4
    dist = lambda *shape: np.concatenate([rng.standard_normal(shape + (ch,)).astype(np.float32),
                                          np.full(shape + (ch,), -100.0, np.float32)], -1)  # draws = means
    batch = {"latent_dist": dist(b, f, h, w), "condition": rng.standard_normal((b, f, h, w, ch)).astype(np.float32),
             "image_embeds": rng.standard_normal((b, 5, 20)).astype(np.float32),
             "text": rng.standard_normal((b, 7, 16)).astype(np.float32)}
    batch.update({f"ref_{k}": v[::-1][:, None] for k, v in batch.items()})
    empty = rng.standard_normal((7, 16)).astype(np.float32)
    x = _wan_inputs(batch, jax.random.PRNGKey(0), empty, 0.5, jnp.float32)
    close = lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    close(x["x0"], batch["latent_dist"][..., :ch])
    mask = np.zeros((b, f, h, w, 4), np.float32)
    mask[:, 0] = 1
    np.testing.assert_array_equal(x["condition"], np.concatenate([mask, batch["condition"]], -1))
    close(x["ref_latents"][..., :ch], batch["ref_latent_dist"][:, 0, ..., :ch])
    np.testing.assert_array_equal(x["ref_latents"][..., ch:], np.concatenate([mask, batch["ref_condition"][:, 0]], -1))
    np.testing.assert_array_equal(x["image"], batch["image_embeds"])
    np.testing.assert_array_equal(x["ref_image"], batch["ref_image_embeds"][:, 0])
    dropped = np.array([np.array_equal(t, empty) for t in np.asarray(x["text"])])
    assert 0 < dropped.sum() < b, dropped
    for i in range(b):
        want = (empty, empty) if dropped[i] else (batch["text"][i], batch["ref_text"][i, 0])
        np.testing.assert_array_equal(x["text"][i], want[0])
        np.testing.assert_array_equal(x["ref_text"][i], want[1])
    two = {**batch, "ref_latent_dist": np.repeat(batch["ref_latent_dist"], 2, axis=1)}
    with pytest.raises(ValueError, match="exactly one reference") as e:
        training.wan_inputs(two, jax.random.PRNGKey(0), empty, 0.0, jnp.float32)
    assert "\n" not in str(e.value)


TINY = {"cogvideox": cog_vap_train_tiny, "wan": wan_vap_train_tiny}
FAMILY_IDS = list(TINY)


def tiny_config(workdir, family="cogvideox", **overrides):
    c = TINY[family].get_config()
    c.workdir = str(workdir)
    c.progress = False
    c.tensorboard = False
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The single-process reference of the SPMD tests, per family: 3 steps of batch 8 in a fresh process,
    dumped once and compared against by both the 8-device and the 2-process runs. (The run's shared
    compilation cache, tests/conftest.py, lets every training subprocess load the programs compiled once.)"""
    runs = {}

    def get(family):
        if family not in runs:
            d = tmp_path_factory.mktemp(f"one_{family}")
            _run_dump(d / "work", d / "one.npz", **SPMD_RUN, family=family)
            runs[family] = d / "one.npz"
        return runs[family]
    return get


SPMD_RUN = dict(steps=3, batch_size=8, async_checkpoint=False)


# Per family: the first `steps` of the tiny config lower the loss, the mean of the last 20 steps below
# `ratio` × the first 20's (measured: CogVideoX 1.75 -> 0.86, Wan 2.96 -> 2.17; only the expert trains,
# so the frozen random backbone sets the floor). A step that does not learn stays near 1.
CONVERGENCE = {"cogvideox": dict(steps=300, ratio=0.7), "wan": dict(steps=100, ratio=0.8)}


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_tiny_training_converges_backbone_untouched(tmp_path, family):
    from train import load_model, train  # noqa: PLC0415
    c = tiny_config(tmp_path, family, steps=CONVERGENCE[family]["steps"])
    _, initial = load_model(c)
    history, state, frozen = train(c)
    losses = np.array([m["loss"] for m in history])
    first, last = losses[:20].mean(), losses[-20:].mean()
    print(f"{family} tiny training: mean loss of steps 0-19 {first:.3f} -> steps {len(losses) - 20}-{len(losses) - 1} "
          f"{last:.3f}")
    assert len(losses) == c.steps and last < CONVERGENCE[family]["ratio"] * first

    # The backbone is bit-identical; only the expert (minus its position-table buffer) moved.
    trainable0, frozen0 = training.split_params(initial)
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen0)
    assert set(vtree.flatten(frozen)) == {p for p in vtree.flatten(initial) if p[0] == "backbone" or p[-1] == "pos_embedding"}
    # Every expert parameter moved, except zero-initialised block parameters without a path to the loss:
    # the stacked layers' leaves move as a whole, but in Wan's last expert layer the biases of the reference
    # queries and of everything after the joint attention have no path (the reference stream is discarded
    # after it; AdamW leaves a zero weight with zero gradient at zero). A stacked leaf counts as moved if
    # any layer's slice moved, so this only catches whole parameters that never train.
    before, after = vtree.flatten(trainable0), vtree.flatten(state.params)
    still = {"/".join(p): before[p] for p, a in after.items() if np.array_equal(a, before[p])}
    assert not [s for s, a in still.items() if not s.startswith("expert/blocks/") or np.any(a)], \
        {s: float(np.abs(a).max()) for s, a in still.items()}
    assert "expert/blocks/attn1/to_k/bias" not in still and "expert/blocks/attn1/to_v/bias" not in still
    still = sorted(still)
    print(f"{len(after) - len(still)} of {len(after)} expert parameters moved; unmoved (no path, zero): {still}")

    # Optimizer state: exactly two moments per trainable parameter (+ counters), nothing for the backbone.
    leaves = [a for a in jax.tree.leaves(state.opt_state) if np.ndim(a) > 0]
    opt_bytes = sum(a.nbytes for a in leaves)
    trainable_bytes = sum(a.nbytes for a in jax.tree.leaves(state.params))
    frozen_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(frozen))
    print(f"optimizer state {opt_bytes} B = 2 x trainable {trainable_bytes} B; frozen {frozen_bytes} B has none")
    assert opt_bytes == 2 * trainable_bytes
    assert len(leaves) == 2 * len(jax.tree.leaves(state.params))


def _worker(workdir, out, env=None, **overrides) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **(env or {})}
    return subprocess.Popen([sys.executable, "tests/train_worker.py", str(workdir), str(out), json.dumps(overrides)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_dump(workdir, out, env=None, **overrides):
    p = _worker(workdir, out, env, **overrides)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def _compare(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    loss_err = np.max(np.abs(a["losses"] - b["losses"]) / np.abs(a["losses"]))
    param_err = max(rel_err(b[k], a[k]) for k in a.files if k != "losses")
    return loss_err, param_err


# An expert attention projection of each family: [layers, embed, heads], FSDP along embed.
EXPERT_Q = {"cogvideox": "expert/blocks/attn/to_q/kernel", "wan": "expert/blocks/attn1/to_q/kernel"}


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_eight_devices_match_one(tmp_path, family, one_process_run):
    """An 8-device FSDP mesh (simulated CPU devices) gives the single device's losses and updated
    parameters to fp32 rounding, and really shards the parameters; the lowered step carries the model's
    activation-sharding constraints (train.py traces it under sharding.use_rules), the batch over fsdp."""
    _run_dump(tmp_path / "eight", tmp_path / "eight.npz",
              {"XLA_FLAGS": with_xla_flags("--xla_force_host_platform_device_count=8")}, **SPMD_RUN, family=family)
    loss_err, param_err = _compare(one_process_run(family), tmp_path / "eight.npz")
    print(f"{family}, 8 devices vs 1: loss rel. diff {loss_err:.1e}, worst parameter rel. diff {param_err:.1e}")
    assert loss_err < 1e-5 and param_err < 1e-5
    specs = json.load(open(str(tmp_path / "eight.npz") + ".specs.json"))
    assert specs[EXPERT_Q[family]] == [None, "fsdp"]  # [layers, embed, heads]
    assert sum("fsdp" in s for s in specs.values()) > len(specs) // 2
    constraints = json.load(open(f"{tmp_path / 'eight.npz'}.p0.json"))["constraints"]
    assert any('"fsdp"' in c for c in constraints), constraints


def test_two_processes_match_one(tmp_path, one_process_run):
    """Two processes on localhost (jax.distributed, CPU collectives) form one run (process_count 2, each
    loading its own half of every batch) and train like one process."""
    import socket  # noqa: PLC0415
    one = one_process_run("cogvideox")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_worker(tmp_path / "two", tmp_path / "two.npz",
                     {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                      "JAX_PROCESS_ID": str(i), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}, **SPMD_RUN)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    loss_err, param_err = _compare(one, tmp_path / "two.npz")
    print(f"2 processes vs 1: loss rel. diff {loss_err:.1e}, worst parameter rel. diff {param_err:.1e}")
    assert loss_err < 1e-5 and param_err < 1e-5
    # One joint run, not two independent ones: each worker saw process_count 2 (it also asserts so) and
    # loaded only its half of every global batch (each worker checks the halves against each other).
    seen = [json.load(open(f"{tmp_path / 'two.npz'}.p{i}.json")) for i in range(2)]
    assert [s["process_count"] for s in seen] == [2, 2] and [s["process_index"] for s in seen] == [0, 1]
    single = json.load(open(f"{one}.p0.json"))["indices"]
    for step in range(SPMD_RUN["steps"]):
        a, b = set(seen[0]["indices"][step]), set(seen[1]["indices"][step])
        assert len(a) == len(b) == SPMD_RUN["batch_size"] // 2 and not a & b and a | b == set(single[step]), (step, a, b, single[step])


MODEL = {"num_layers": 3, "expert_layers": [0, 1]}


def _tiny_state(dtype=jnp.float32, layers=2, extra=False):
    params = {"expert": {"w": jnp.ones((layers, 3), dtype), "b": jnp.zeros(3, dtype)}}
    if extra:
        params["backbone"] = {"head": jnp.zeros(3, dtype)}
    return training.init_state(params, optax.adam(1e-3))


def _abstract(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


def _checkpoints(directory, model=MODEL):
    return training.TrainCheckpoints(str(directory), every=1, keep=5, model=model, async_save=False)


def _save_steps(directory, steps=(1, 2, 3)):
    ck = _checkpoints(directory)
    for s in steps:
        state = _tiny_state()
        ck.save(s, dataclasses.replace(state, step=jnp.asarray(s, jnp.int32)), {"step": s}, {"run": "test"})
    ck.wait()
    ck.close()


def _corrupt(step_dir, item="state"):
    for f in (step_dir / item).rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupt")


def test_checkpoint_corrupt_falls_back_unreadable_all_is_an_error(tmp_path, caplog):
    """A corrupt newest step (array files or its signature) is skipped for the one before; a workdir whose
    steps are all unreadable is an error, never a silent restart from step 0."""
    _save_steps(tmp_path)
    _corrupt(tmp_path / "3")
    _corrupt(tmp_path / "2", "signature")
    step, state, data = _checkpoints(tmp_path).restore(_abstract(_tiny_state()))
    assert step == 1 and int(state.step) == 1 and data == {"step": 1}
    assert caplog.text.count("unreadable") == 2, caplog.text
    _corrupt(tmp_path / "1")
    with pytest.raises(training.CheckpointError) as e:
        _checkpoints(tmp_path).restore(_abstract(_tiny_state()))
    assert "no readable checkpoint among steps [3, 2, 1]" in str(e.value) and "\n" not in str(e.value)
    assert _checkpoints(tmp_path / "empty").restore(_abstract(_tiny_state())) is None   # a fresh workdir


@pytest.mark.parametrize("model, state, complaint", [
    ({**MODEL, "expert_layers": [0, 2]}, {},
     "model config field expert_layers is [0, 1] in the checkpoint, [0, 2] in this run"),
    (MODEL, dict(dtype=jnp.bfloat16), "params/expert/b is float32[3] in the checkpoint, bfloat16[3] in this run (and"),
    (MODEL, dict(layers=3), "params/expert/w is float32[2, 3] in the checkpoint, float32[3, 3] in this run (and"),
    (MODEL, dict(extra=True), "params/backbone/head is not in the checkpoint (and"),
    ({**MODEL, "head_dim": 16}, {}, "model config field head_dim is not in the checkpoint"),
], ids=["expert_layers", "dtype", "shape", "extra_parameter", "config_field"])
def test_incompatible_checkpoint_is_a_one_line_error(tmp_path, model, state, complaint):
    """A readable checkpoint of another model (config, expert layers, shapes, dtypes) stops the resume with
    one line naming the difference — before any array is read, never falling back to an older step."""
    _save_steps(tmp_path)
    with pytest.raises(training.CheckpointError) as e:
        _checkpoints(tmp_path, model).restore(_abstract(_tiny_state(**state)))
    msg = str(e.value)
    assert "checkpoint step 3" in msg and complaint in msg and "\n" not in msg, msg


def test_train_refuses_a_checkpoint_of_other_expert_layers(tmp_path):
    """train.py compares the model config: experts on layers (0, 2) instead of (0, 1) have the same
    stacked shapes, yet resuming from such a checkpoint is an error naming expert_layers."""
    from train import checkpoints, setup, train  # noqa: PLC0415
    c = tiny_config(tmp_path, steps=2)
    cfg, _, state, _, _ = setup(c)
    ck = checkpoints(c, cfg)
    ck.save(1, state, {"step": 1, "seed": c.data.seed}, {}, force=True)
    ck.wait()
    ck.close()
    c.model.expert_layers = (0, 2)
    with pytest.raises(training.CheckpointError, match=r"expert_layers is \[0, 1\] in the checkpoint, \[0, 2\]"):
        train(c)


def _train_cli(workdir, *overrides, family="cogvideox", env=None):
    args = [sys.executable, "train.py", "--config", f"configs/{TINY[family].__name__.split('.')[-1]}.py",
            f"--config.workdir={workdir}", "--config.progress=False", "--config.tensorboard=False", *overrides]
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _losses(workdir) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a step re-run after a resume keeps its last record."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


def _final_params(workdir, step):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return vtree.flatten(state["params"] if isinstance(state, dict) else state.params)


def _wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_kill_and_resume(tmp_path, family):
    """SIGKILL between saves and during a save, then resume: the same losses and parameters as an
    uninterrupted run. A corrupt newest checkpoint is skipped for the previous complete one."""
    steps = ["--config.steps=30", "--config.checkpoint_every=5", "--config.keep=3"]
    run = lambda workdir: _train_cli(workdir, *steps, family=family)
    ref = run(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.communicate()[1][-3000:]
    want_losses, want_params = _losses(tmp_path / "ref"), _final_params(tmp_path / "ref", 30)

    work = tmp_path / "killed"
    ckpts = work / "checkpoints"
    metrics = work / "metrics.jsonl"
    # 1. Killed between saves (after step 12's metrics line, before the step-15 save).
    p = run(work)
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 13, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # 2. Resumed, and killed as soon as a checkpoint is being written (orbax's temporary folder).
    p = run(work)
    _wait_for(lambda: ckpts.exists() and any("tmp" in d.name for d in ckpts.iterdir()), p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # 3. The newest complete checkpoint is made unreadable: resume must fall back to the one before.
    complete = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())
    for f in (ckpts / str(complete[-1]) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupt")
    p = run(work)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "unreadable" in err and f"resumed from step {complete[-2]}" in out, (out[-2000:], err[-2000:])

    got = _losses(work)
    assert sorted(got) == list(range(30))
    assert len(metrics.read_text().splitlines()) == 30   # a resumed run replaces the rows it redoes
    np.testing.assert_array_equal([got[s] for s in range(30)], [want_losses[s] for s in range(30)])
    params = _final_params(work, 30)
    for k, v in want_params.items():
        np.testing.assert_array_equal(params[k], v)


def test_train_cli_bad_paths_are_one_line_errors(tmp_path):
    """A missing data folder (was a 62-line TFDS traceback, exit 1, an empty workdir left behind) and a
    workdir that is a file (was FileExistsError) are one `error:` line and exit status 2, before anything
    is created or compiled."""
    from train import UsageError, check_paths  # noqa: PLC0415
    work = tmp_path / "run"
    p = _train_cli(work, "--config.data.kind=latents", f"--config.data.dir={tmp_path / 'nowhere'}")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and err.strip().count("\n") == 0, err[-2000:]
    assert err.startswith("error: data.dir") and "no such folder" in err and not work.exists()
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "file", {}, "is a file, not a folder"),
             (work, {"data.kind": "latents", "data.dir": str(tmp_path / "empty")}, "not a prepared dataset"),
             (work, {"data.kind": "raw", "data.dir": ""}, "needs --config.data.dir")]
    for workdir, overrides, message in cases:
        with pytest.raises(UsageError, match=message) as e:
            check_paths(tiny_config(workdir, **overrides))
        assert "\n" not in str(e.value)


def test_ctrl_c_while_compiling_exits_130(tmp_path):
    """SIGINT before the first step has run (here: as the step function compiles) ends the run at once
    with status 130 and one line, no traceback (it was a KeyboardInterrupt unwinding through the compiler,
    then a segfault, rc 139)."""
    p = _train_cli(tmp_path, env={"VAPJAX_NO_COMPILE_CACHE": "1"})
    _wait_for(lambda: (tmp_path / "metrics.jsonl").exists(), p)   # opened just before the first step
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, \
        err[-3000:]
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_metrics_of_a_resumed_run_are_not_duplicated(tmp_path):
    """A run resumed at step 3 drops the earlier run's rows from step 3 on (metrics.jsonl, and TensorBoard
    by a purge at step 3): it redoes those steps."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415
    from train import MetricsSink  # noqa: PLC0415
    c = tiny_config(tmp_path)
    c.tensorboard = True
    rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(6)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 6, "lo')   # a torn last row
    sink = MetricsSink(c, enabled=True, start=3)
    sink.step({"step": 3, "loss": 0.5})
    sink.close()
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]

    def records(path):   # TFRecord framing: length, its CRC, the event, its CRC
        data = path.read_bytes()
        while data:
            n = int.from_bytes(data[:8], "little")
            yield data[12:12 + n]
            data = data[16 + n:]

    events = [event_pb2.Event.FromString(r) for f in (tmp_path / "tb").iterdir() for r in records(f)]
    purges = [e.step for e in events if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert purges == [3]


def test_non_finite_loss_stops_without_poisoned_checkpoint(tmp_path):
    """A diverging run stops with a one-line error and leaves only checkpoints from before."""
    p = _train_cli(tmp_path, "--config.steps=40", "--config.checkpoint_every=2",
                   "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=1",
                   "--config.optimizer.grad_clip=1e30", "--config.async_checkpoint=False")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "non-finite loss" in line[0], err[-2000:]
    bad_step = int(line[0].split("at step ")[1].split(";")[0])
    steps = [int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit()]
    assert all(s <= bad_step for s in steps)
    for s in steps:  # every saved state is finite
        assert all(np.all(np.isfinite(a)) for a in _final_params(tmp_path, s).values())


def test_train_on_precomputed_vap_data(tmp_path):
    """The whole data path into train.py: a mini VAP-Data folder -> the vap_data TFDS dataset ->
    latents precomputed with the (converted, official tiny) pipeline's VAE and T5 -> training the
    pipeline's transformer from its converted checkpoint."""
    from conftest import golden_dir  # noqa: PLC0415
    from convert.pipeline import convert_pipeline  # noqa: PLC0415
    from train import train  # noqa: PLC0415
    from vapjax.data import precompute, synthetic, vap_data  # noqa: PLC0415
    from vapjax.data.features import CogVideoXFeatures, load_features  # noqa: PLC0415

    raw = synthetic.write(str(tmp_path / "raw"))
    data = vap_data.build(raw, str(tmp_path / "data"), "tiny", workers=2)
    convert_pipeline(str(golden_dir() / "cog_pipeline_tiny"), str(tmp_path / "pipe"))
    features = load_features(str(tmp_path / "pipe"), text_length=96)  # the tiny model's caption length
    assert isinstance(features, CogVideoXFeatures)
    latents = precompute.precompute(data, str(tmp_path / "latents"), features, dtype="float32")

    c = tiny_config(tmp_path / "run", steps=6, batch_size=2, random_init=False,
                    init_checkpoint=str(tmp_path / "pipe" / "transformer"))
    c.model = ml_collections.ConfigDict()  # the checkpoint's architecture (c.model would override it)
    c.data.kind, c.data.dir = "latents", latents.data_dir
    history, state, frozen = train(c)
    losses = [m["loss"] for m in history]
    assert len(losses) == 6 and np.all(np.isfinite(losses))
    assert set(vtree.flatten(state.params)) and all(p[0] == "expert" for p in vtree.flatten(state.params))

    # The raw clips, encoded on the fly by the same VAE and T5.
    c = tiny_config(tmp_path / "run_raw", steps=2, batch_size=2, random_init=False,
                    init_checkpoint=str(tmp_path / "pipe" / "transformer"))
    c.model = ml_collections.ConfigDict()
    c.data.kind, c.data.dir, c.data.pipeline = "raw", data.data_dir, str(tmp_path / "pipe")
    history, _, _ = train(c)
    assert len(history) == 2 and np.all(np.isfinite([m["loss"] for m in history]))


def tiny_wan_pipeline(path, model_cfg) -> None:
    """A converted-pipeline folder with tiny random Wan encoders (VAE with 8x spatial, 4x temporal
    compression to `model_cfg.out_channels` latent channels; UMT5 of width text_dim; CLIP of width
    image_dim on 16x16 crops) and the tiny sentencepiece tokenizer."""
    import shutil  # noqa: PLC0415
    from vapjax import checkpoint  # noqa: PLC0415
    from vapjax.models import clip, t5, wan_vae  # noqa: PLC0415
    from vapjax.random_init import random_params  # noqa: PLC0415
    z = model_cfg.out_channels
    parts = {
        "vae": (wan_vae.VAEConfig(base_dim=8, z_dim=z, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                                  latents_mean=np.linspace(-0.5, 0.5, z), latents_std=np.linspace(0.5, 2.0, z)),
                wan_vae.init_params),
        "text_encoder": (t5.T5Config(vocab_size=128, d_model=model_cfg.text_dim, d_kv=8, num_heads=2, d_ff=32,
                                     num_layers=2, feed_forward_proj="gated-gelu", per_layer_position_bias=True),
                         t5.init_params),
        "image_encoder": (clip.CLIPVisionConfig(hidden_size=model_cfg.image_dim, intermediate_size=32, num_layers=2,
                                                num_heads=2, patch_size=4, image_size=16), clip.init_params),
    }
    for i, (name, (cfg, init)) in enumerate(parts.items()):
        checkpoint.save(str(path / name), random_params(jax.eval_shape(lambda: init(cfg, jax.random.key(0))), i), cfg)
    shutil.copytree(ROOT / "vapjax" / "assets" / "tiny_tokenizer", path / "tokenizer")
    (path / "image_processor").mkdir()
    (path / "image_processor" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 16},
         "crop_size": {"height": 16, "width": 16}}))


def test_train_on_precomputed_wan_data(tmp_path):
    """Wan's whole data path into train.py: mini VAP-Data -> vap_data -> Wan features precomputed with tiny
    random encoders -> the paired loader -> training a converted tiny Wan-VAP checkpoint. The stored
    features are the official trainer's: VAE moments with mean AND log-variance normalised per channel
    (spec §8.9; the log-variance unclipped until the trainer's draw), the condition as the normalised mode
    of [first frame, zeros…], CLIP of the first frame, UMT5 without a mask (pads kept, no cleaning)."""
    from train import train  # noqa: PLC0415
    from vapjax import checkpoint, video  # noqa: PLC0415
    from vapjax.data import loader, precompute, synthetic, vap_data  # noqa: PLC0415
    from vapjax.data.features import WanFeatures, load_features  # noqa: PLC0415
    from vapjax.models import t5, wan, wan_vae  # noqa: PLC0415
    from vapjax.random_init import random_params  # noqa: PLC0415

    c = tiny_config(tmp_path / "run", "wan", steps=2, batch_size=2, random_init=False)
    cfg = wan.WanConfig(**c.model.to_dict())
    checkpoint.save(str(tmp_path / "init"), random_params(wan.param_shapes(cfg), 0), cfg)
    tiny_wan_pipeline(tmp_path / "pipe", cfg)
    raw = synthetic.write(str(tmp_path / "raw"))
    data = vap_data.build(raw, str(tmp_path / "data"), "tiny", workers=2)
    features = load_features(str(tmp_path / "pipe"), text_length=c.data.text_len)
    assert isinstance(features, WanFeatures)
    latents = precompute.precompute(data, str(tmp_path / "latents"), features, batch_size=2, dtype="float32")

    # One stored example against the encoders called directly.
    example, clip_ = latents.as_data_source(split="train")[0], data.as_data_source(split="train")[0]
    enc = features.encoders
    vae = wan_vae.AutoencoderKLWan(enc.vae_config)
    vparams = checkpoint.load(str(tmp_path / "pipe" / "vae"), "wan_vae")[1]
    x = video.to_model_range(clip_["video"])[None]
    mean, logvar = np.split(np.asarray(vae.apply({"params": vparams}, x, method="moments"))[0], 2, -1)
    norm = lambda a: (a - np.float32(enc.vae_config.latents_mean)) * (1 / np.float32(enc.vae_config.latents_std))
    close = lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    close(example["latent_dist"], np.concatenate([norm(mean), norm(logvar)], -1))
    cond = np.concatenate([x[:, :1], np.zeros_like(x[:, 1:])], 1)
    close(example["condition"], norm(np.asarray(vae.apply({"params": vparams}, cond, method="encode").mode())[0]))
    assert example["latent_dist"].shape == (3, 8, 12, 8) and example["condition"].shape == (3, 8, 12, 4)
    assert example["image_embeds"].shape == (17, cfg.image_dim)
    close(example["image_embeds"], enc.image_embeds(enc.image_pixels(clip_["video"][None, 0]))[0])  # as inference
    tcfg, tparams = checkpoint.load(str(tmp_path / "pipe" / "text_encoder"), "t5_encoder")
    ids = enc.tokenizer([clip_["caption"].decode()], c.data.text_len)  # no mask: pads attend and are kept
    close(example["text"], t5.T5Encoder(tcfg).apply({"params": tparams}, ids)[0])
    assert np.any(example["text"][-1])

    # The names and kinds travel with the features (the DPO sampler reads them from the index).
    ok = [clip for clip in synthetic.CLIPS if clip.expect == "ok"]
    assert loader.example_index(latents.data_dir) == {"path": [o.path for o in ok], "kind": [o.kind for o in ok],
                                                      "split": ["train"] * len(ok)}
    assert example["kind"] == ok[0].kind.encode()
    # The loader pairs every Wan field; training runs on them from the converted checkpoint.
    batch = next(loader.make_loader(latents.data_dir, batch_size=2, seed=0))
    assert {k for k in batch if k.startswith("ref_")} == {"ref_latent_dist", "ref_condition", "ref_image_embeds",
                                                          "ref_text", "ref_index", "ref_count"}
    c.init_checkpoint = str(tmp_path / "init")
    c.data.kind, c.data.dir = "latents", latents.data_dir
    history, state, _ = train(c)
    assert len(history) == 2 and np.all(np.isfinite([m["loss"] for m in history]))
    assert all(p[0] == "expert" for p in vtree.flatten(state.params))
    # (The on-the-fly path, data.kind "raw", runs the same `features.encode` through the family-agnostic
    # `features.EncodedBatches` that test_train_on_precomputed_vap_data trains on.)


def test_unfreeze_regex_and_fp32_moments(tmp_path):
    """--config.unfreeze trains more than the expert; bf16 weights keep fp32 Adam moments."""
    from train import load_model, train  # noqa: PLC0415
    c = tiny_config(tmp_path, steps=2, unfreeze="backbone/head/")
    c.model_options.update(dict(dtype="bfloat16", param_dtype="bfloat16"))
    c.optimizer.fp32_moments = True
    _, initial = load_model(c)
    _, state, frozen = train(c)
    trained = {p[:2] for p in vtree.flatten(state.params)}
    assert trained == {("expert", "blocks"), ("expert", "patch_embed"), ("expert", "time_embedding"),
                       ("backbone", "head")}
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(state.params))
    moments = [a for a in jax.tree.leaves(state.opt_state) if np.ndim(a) > 0]
    assert moments and all(a.dtype == jnp.float32 for a in moments)
    head = vtree.flatten(state.params)[("backbone", "head", "proj_out", "kernel")]
    assert np.any(np.asarray(head) != np.asarray(initial["backbone"]["head"]["proj_out"]["kernel"]))



def test_fp32_master_keeps_small_updates(tmp_path):
    """optimizer.fp32_master: the trainable weights are float32 masters of a bf16 model (the frozen ones
    stay bf16). Three Adam steps at lr 1e-5 move the master weights, while a bf16 weight would keep few
    of those moves (the rest round back to the bf16 grid); the step computes with bf16 copies, so the
    first step's loss is the bf16 run's."""
    from train import load_model, train  # noqa: PLC0415
    c = tiny_config(tmp_path, steps=3, **{"optimizer.learning_rate": 1e-5, "optimizer.warmup_steps": 0,
                                          "optimizer.fp32_master": True})
    c.model_options.update(dict(dtype="bfloat16", param_dtype="bfloat16"))
    _, initial = load_model(c)
    history, state, frozen = train(c)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.params))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(frozen) if jnp.issubdtype(a.dtype, jnp.floating))
    flat, init = vtree.flatten(state.params), vtree.flatten(initial)
    moved = lambda cast: np.mean(np.concatenate([np.ravel(cast(a) != cast(init[p])) for p, a in flat.items()]))
    in_master, in_bf16 = moved(np.asarray), moved(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16)))
    print(f"3 steps at lr 1e-5: fraction of weights moved, fp32 masters {in_master:.3f}, rounded to bf16 {in_bf16:.3f}")
    assert in_master > 0.5 and in_bf16 < 0.2 * in_master   # (the last expert layer's tail gets no gradient)
    c2 = tiny_config(tmp_path / "bf16", steps=1, **{"optimizer.learning_rate": 1e-5, "optimizer.warmup_steps": 0})
    c2.model_options.update(dict(dtype="bfloat16", param_dtype="bfloat16"))
    assert train(c2)[0][0]["loss"] == history[0]["loss"]

def test_ablation_structure_trains_from_a_vap_checkpoint(tmp_path):
    """A training config switches a converted VAP checkpoint to an ablation (c.model overrides the
    checkpoint's architecture): single-branch LoRA drops the expert, adds a zero-initialised LoRA, trains
    only it for two steps and leaves the backbone bit-identical."""
    from train import load_model, train  # noqa: PLC0415
    from vapjax import checkpoint  # noqa: PLC0415
    c = tiny_config(tmp_path / "run", steps=2)
    cfg, params = load_model(c)
    checkpoint.save(str(tmp_path / "vap"), params, cfg)
    c.random_init = False
    c.init_checkpoint = str(tmp_path / "vap")
    c.model = ml_collections.ConfigDict(dict(structure="single_branch_lora", lora_rank=4, expert_layers=()))
    cfg2, initial = load_model(c)
    assert cfg2.structure == "single_branch_lora" and set(initial) == {"backbone", "lora"}
    assert all(np.all(ab["lora_b"] == 0) for ab in initial["lora"]["blocks"].values())
    history, state, frozen = train(c)
    assert len(history) == 2 and all(np.isfinite(m["loss"]) for m in history)
    assert set(state.params) == {"lora"}
    jax.tree.map(np.testing.assert_array_equal, frozen, {"backbone": params["backbone"]})
    assert all(np.any(np.asarray(ab["lora_b"]) != 0) for ab in state.params["lora"]["blocks"].values())



def test_noisy_reference_trains_from_a_vap_checkpoint(tmp_path):
    """ref_noise with model.ref_head=True on a VAP checkpoint without an expert head: the head starts as
    the backbone's (the official init copies every `_mot_ref` module from its base), two steps log the
    reference loss and train the head."""
    from train import load_model, train  # noqa: PLC0415
    from vapjax import checkpoint  # noqa: PLC0415
    c = tiny_config(tmp_path / "run", steps=2, ref_noise=True, ref_noise_steps=100)
    cfg, params = load_model(c)
    checkpoint.save(str(tmp_path / "vap"), params, cfg)
    c.random_init, c.init_checkpoint = False, str(tmp_path / "vap")
    c.model = ml_collections.ConfigDict(dict(ref_head=True))
    _, initial = load_model(c)
    jax.tree.map(np.testing.assert_array_equal, initial["expert"]["head"], initial["backbone"]["head"])
    history, state, _ = train(c)
    assert all(np.isfinite(m["loss_reference"]) and m["loss_reference"] > 0 for m in history)
    head = state.params["expert"]["head"]["proj_out"]["kernel"]
    assert np.any(np.asarray(head) != np.asarray(initial["expert"]["head"]["proj_out"]["kernel"]))

def test_noisy_reference():
    """The official reference_independent mode (TR:631-649, 742-767; CSPEC:609-618, 731-734): each
    reference is noised to its own t_ref from the lowest K timesteps (K = 0: the official t = 999), clip
    channels only (ᾱ = 1 leaves them, ᾱ = 0 replaces them by unit noise); the reference loss is the
    §7.3 objective of the expert's prediction per reference × 0.6 / num_refs, summed; the expert's adaLN
    keeps the target t unless ref_noise_adaln (a stand-in model records its call)."""
    rng = np.random.default_rng(0)
    x0, ref = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((2, 2, 2, 3, 8), (2, 4, 2, 3, 8)))
    cond = {"x0": x0, "ref_latents": ref, "text": jnp.zeros(1)}
    for value in (1.0, 0.0):
        out = training.noisy_reference(cond, jax.random.PRNGKey(0), np.full(1000, value))
        np.testing.assert_array_equal(out["ref_latents"][..., 4:], ref[..., 4:])
        np.testing.assert_array_equal(out["ref_x0"], ref[..., :4])
        assert out["ref_noise_t"].shape == (2, 2) and "ref_t" not in out and out["text"] is cond["text"]
        clip = np.asarray(out["ref_latents"][..., :4])
        if value == 1.0:
            np.testing.assert_array_equal(clip, ref[..., :4])
        else:
            corr = np.corrcoef(clip.ravel(), np.asarray(ref[..., :4]).ravel())[0, 1]
            assert abs(corr) < 0.2 and 0.8 < clip.std() < 1.2
    with pytest.raises(ValueError, match="needs one reference, the batch has 2"):
        training.noisy_reference(cond, jax.random.PRNGKey(0), np.full(1000, 0.5), drive_adaln=True)
    key = jax.random.PRNGKey(3)
    table = training.ddim_timestep_table()
    assert set(np.asarray(training.reference_timesteps(key, (4000,), 50)).tolist()) == set(table[-50:].tolist())
    assert set(np.asarray(training.reference_timesteps(key, (10,), 0)).tolist()) == {999}

    # The loss, per reference, as the official trainer writes it (scheduler.get_velocity, 1/(1−ᾱ)).
    sched = CogVideoXDDIMScheduler.from_config(cog_vap_train.COGVIDEOX_SCHEDULER)
    alphas = DDIMSchedule.from_config(cog_vap_train.COGVIDEOX_SCHEDULER).alphas_cumprod
    noisy = training.noisy_reference(cond, jax.random.PRNGKey(0), alphas, num_steps=20)
    v = rng.standard_normal((2, 4, 2, 3, 4)).astype(np.float32)
    want = 0.0
    for i in range(2):
        t_i = torch.from_numpy(np.asarray(noisy["ref_noise_t"][:, i]))
        x_t = torch.from_numpy(np.asarray(noisy["ref_latents"][:, 2 * i:2 * i + 2, ..., :4]))
        pred = sched.get_velocity(torch.from_numpy(v[:, 2 * i:2 * i + 2]), x_t, t_i)
        w = (1 / (1 - sched.alphas_cumprod[t_i])).float().reshape(-1, 1, 1, 1, 1)
        want += (w * (pred - torch.from_numpy(np.asarray(ref[:, 2 * i:2 * i + 2, ..., :4]))) ** 2).mean((1, 2, 3, 4)).mean() * 0.6 / 3
    got = training.reference_loss(jnp.asarray(v), noisy, alphas, num_refs=3)
    assert abs(float(got) - want.item()) <= 1e-5 * want.item()

    class Recorder:  # the model's call signature; predicts zeros for the target and the references
        def apply(self, variables, latents, text, t, ref_latents, ref_text, ref_t=None, ref_output=False):
            self.ref_latents, self.ref_t, self.ref_output = ref_latents, ref_t, ref_output
            out = jnp.zeros(latents.shape[:-1] + (latents.shape[-1] // 2,), latents.dtype)
            return (out, jnp.zeros(ref_latents.shape[:-1] + (ref_latents.shape[-1] // 2,))) if ref_output else out

    from vapjax import families  # noqa: PLC0415
    c = tiny_config("/unused")
    cfg = cogvideox.CogVideoXConfig(**c.model.to_dict(), **{**c.model_options.to_dict(), "attention": None})
    data, empty = families.get("cogvideox").synthetic_data(c, cfg)
    batch, alphas = next(data), DDIMSchedule.from_config(c.scheduler.to_dict()).alphas_cumprod
    seen = {}
    for noisy, adaln in ((False, False), (True, False), (True, True)):
        model = Recorder()
        objective = training.cogvideox_objective(model, alphas, scaling_factor=0.7, caption_dropout=0.0,
                                                 dtype=jnp.float32, ref_noise=noisy, ref_noise_steps=100,
                                                 ref_noise_adaln=adaln)
        out = objective(None, batch, jax.random.PRNGKey(1), jnp.asarray(empty))
        loss = out[0] if noisy else out
        assert np.isfinite(float(loss))
        if noisy:
            assert float(out[1]["loss_reference"]) > 0 and float(loss) == float(out[1]["loss_target"] + out[1]["loss_reference"])
        seen[noisy, adaln] = model
    assert seen[False, False].ref_t is None and not seen[False, False].ref_output
    assert seen[True, False].ref_t is None and seen[True, False].ref_output       # official default: target t
    assert seen[True, True].ref_t.shape == (c.batch_size,) and np.all(np.asarray(seen[True, True].ref_t) < 100)
    clean, noised = seen[False, False].ref_latents, seen[True, False].ref_latents
    half = clean.shape[-1] // 2
    np.testing.assert_array_equal(noised[..., half:], clean[..., half:])
    assert not np.allclose(noised[..., :half], clean[..., :half])
