"""Training: the objective against PyTorch, the frozen backbone, convergence, SPMD equivalence
(8 simulated devices, 2 processes), and kill/resume."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import torch
from diffusers import CogVideoXDDIMScheduler

from conftest import ROOT, rel_err
from configs import cog_vap_train, cog_vap_train_tiny
from convert.cogvideox import convert_transformer, rules, target_shapes
from test_cogvideox import stock_model
from vapjax import training
from vapjax import tree as vtree
from vapjax.models import cogvideox
from vapjax.sampling import DDIMSchedule

SCHEDULER = cog_vap_train.COGVIDEOX_SCHEDULER


def test_timestep_draw_matches_official_quirk():
    """⌊float32((T−1−idx)/T)·T⌋: uniform over 0..999 except five values shifted down by one."""
    t = np.asarray(training.cogvideox_timesteps(jax.random.PRNGKey(0), 200_000))
    assert t.min() == 0 and t.max() == 999
    direct = np.floor(((999 - np.arange(1000)).astype(np.float32) / np.float32(1000)) * np.float32(1000))
    assert sorted(set(np.arange(1000)) - set(direct.astype(int))) == [251, 253, 502, 506, 511]


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
    alphas = jnp.asarray(DDIMSchedule.from_config(SCHEDULER).alphas_cumprod, jnp.float32)

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
    """Wan's objective on a linear 'model': x_t, target and weighting by hand."""
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float32)
    sigma = np.array([0.25, 0.9], np.float32)
    seen = {}

    def predict(x_t, t):
        seen["t"] = t
        return 2.0 * x_t

    loss = training.flow_matching_loss(predict, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sigma))
    s = sigma.reshape(-1, 1, 1)
    want = np.mean((2 * ((1 - s) * x0 + s * noise) - (noise - x0)) ** 2)
    assert abs(float(loss) - want) < 1e-5 * want
    np.testing.assert_array_equal(seen["t"], [250, 900])
    sig = np.asarray(training.flow_sigmas(jax.random.PRNGKey(0), 10_000))
    assert 0 < sig.min() and sig.max() <= 1 and abs(np.median(sig) - 0.5) < 0.02  # logit-normal around 1/2


def tiny_config(workdir, **overrides):
    c = cog_vap_train_tiny.get_config()
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


def test_tiny_training_converges_backbone_untouched(tmp_path):
    from train import load_model, train  # noqa: PLC0415
    c = tiny_config(tmp_path)
    _, initial = load_model(c)
    history, state, frozen = train(c)
    losses = np.array([m["loss"] for m in history])
    first, last = losses[:30].mean(), losses[-30:].mean()
    print(f"tiny training: mean loss of steps 0-29 {first:.3f} -> steps {len(losses) - 30}-{len(losses) - 1} {last:.3f}")
    assert len(losses) == c.steps and last < 0.7 * first

    # The backbone is bit-identical; only the expert (minus its position-table buffer) moved.
    trainable0, frozen0 = training.split_params(initial)
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen0)
    assert set(vtree.flatten(frozen)) == {p for p in vtree.flatten(initial) if p[0] == "backbone" or p[-1] == "pos_embedding"}
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params, trainable0)
    assert all(jax.tree.leaves(moved))

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


def test_eight_devices_match_one(tmp_path):
    """An 8-device FSDP mesh (simulated CPU devices) gives the single device's losses and updated
    parameters to fp32 rounding, and really shards the parameters."""
    common = dict(steps=3, batch_size=8, async_checkpoint=False)
    _run_dump(tmp_path / "one", tmp_path / "one.npz", **common)
    _run_dump(tmp_path / "eight", tmp_path / "eight.npz", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
              **common)
    loss_err, param_err = _compare(tmp_path / "one.npz", tmp_path / "eight.npz")
    print(f"8 devices vs 1: loss rel. diff {loss_err:.1e}, worst parameter rel. diff {param_err:.1e}")
    assert loss_err < 1e-5 and param_err < 1e-5
    specs = json.load(open(str(tmp_path / "eight.npz") + ".specs.json"))
    assert specs["expert/blocks/attn/to_q/kernel"] == [None, "fsdp"]  # [layers, embed, heads]
    assert sum("fsdp" in s for s in specs.values()) > len(specs) // 2


def test_two_processes_match_one(tmp_path):
    """Two processes on localhost (jax.distributed, CPU collectives) train like one process."""
    import socket  # noqa: PLC0415
    common = dict(steps=3, batch_size=4, async_checkpoint=False)
    _run_dump(tmp_path / "one", tmp_path / "one.npz", **common)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_worker(tmp_path / "two", tmp_path / "two.npz",
                     {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                      "JAX_PROCESS_ID": str(i), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}, **common)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    loss_err, param_err = _compare(tmp_path / "one.npz", tmp_path / "two.npz")
    print(f"2 processes vs 1: loss rel. diff {loss_err:.1e}, worst parameter rel. diff {param_err:.1e}")
    assert loss_err < 1e-5 and param_err < 1e-5


def _train_cli(workdir, *overrides):
    args = [sys.executable, "train.py", "--config", "configs/cog_vap_train_tiny.py", f"--config.workdir={workdir}",
            "--config.progress=False", "--config.tensorboard=False", *overrides]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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


def test_kill_and_resume(tmp_path):
    """SIGKILL between saves and during a save, then resume: the same losses and parameters as an
    uninterrupted run. A corrupt newest checkpoint is skipped for the previous complete one."""
    steps = ["--config.steps=30", "--config.checkpoint_every=5", "--config.keep=3"]
    ref = _train_cli(tmp_path / "ref", *steps)
    assert ref.wait(timeout=600) == 0, ref.communicate()[1][-3000:]
    want_losses, want_params = _losses(tmp_path / "ref"), _final_params(tmp_path / "ref", 30)

    work = tmp_path / "killed"
    ckpts = work / "checkpoints"
    metrics = work / "metrics.jsonl"
    # 1. Killed between saves (after step 12's metrics line, before the step-15 save).
    p = _train_cli(work, *steps)
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 13, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # 2. Resumed, and killed as soon as a checkpoint is being written (orbax's temporary folder).
    p = _train_cli(work, *steps)
    _wait_for(lambda: ckpts.exists() and any("tmp" in d.name for d in ckpts.iterdir()), p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # 3. The newest complete checkpoint is made unreadable: resume must fall back to the one before.
    complete = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())
    for f in (ckpts / str(complete[-1]) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupt")
    p = _train_cli(work, *steps)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "unreadable" in err and f"resumed from step {complete[-2]}" in out, (out[-2000:], err[-2000:])

    got = _losses(work)
    assert sorted(got) == list(range(30))
    np.testing.assert_array_equal([got[s] for s in range(30)], [want_losses[s] for s in range(30)])
    params = _final_params(work, 30)
    for k, v in want_params.items():
        np.testing.assert_array_equal(params[k], v)


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

    raw = synthetic.write(str(tmp_path / "raw"))
    data = vap_data.build(raw, str(tmp_path / "data"), "tiny", workers=2)
    convert_pipeline(str(golden_dir() / "cog_pipeline_tiny"), str(tmp_path / "pipe"))
    encoders = precompute.Encoders.load(str(tmp_path / "pipe"), max_length=96)  # the tiny model's caption length
    latents = precompute.precompute(data, str(tmp_path / "latents"), encoders, dtype="float32")

    c = tiny_config(tmp_path / "run", steps=6, batch_size=2, random_init=False,
                    init_checkpoint=str(tmp_path / "pipe" / "transformer"))
    c.data.kind, c.data.dir = "latents", latents.data_dir
    history, state, frozen = train(c)
    losses = [m["loss"] for m in history]
    assert len(losses) == 6 and np.all(np.isfinite(losses))
    assert set(vtree.flatten(state.params)) and all(p[0] == "expert" for p in vtree.flatten(state.params))

    # The raw clips, encoded on the fly by the same VAE and T5.
    c = tiny_config(tmp_path / "run_raw", steps=2, batch_size=2, random_init=False,
                    init_checkpoint=str(tmp_path / "pipe" / "transformer"))
    c.data.kind, c.data.dir, c.data.pipeline = "raw", data.data_dir, str(tmp_path / "pipe")
    history, _, _ = train(c)
    assert len(history) == 2 and np.all(np.isfinite([m["loss"] for m in history]))


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
